"""A factory recipe end to end on the tiny teacher: the factory's views feed each method, students are
scored by held-out answer accuracy, the report carries the funnel. The tiny random teacher is never right,
so its sampler is replaced by one that answers from the task references (right on some samples, wrong
on others), which keeps the test about the wiring, not about the teacher."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from distill.errors import RecipeError
from distill.pipeline import run_recipe
from distill.reasoning.tasks import make_tasks
from distill.recipe import parse_recipe
from tests.cli.test_errors import assert_one_line_error, run_cli, write
from tests.conftest import tiny_recipe

TASKS = [{"name": "arithmetic", "count": 16}, {"name": "units", "count": 8}]


class ReferenceSampler:
    """Answers each prompt from its reference: samples alternate right / wrong, with a short rationale."""

    ident = "reference-sampler"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        items = [i for t in TASKS for i in make_tasks(t["name"], t["count"], seed=0)]
        self.answers = {i.prompt: i.answer for i in items}
        self.calls = 0

    def sample(self, prompts: list[list[int]], n: int, seed: int) -> list[list[tuple[str, bool]]]:
        self.calls += 1
        rng = random.Random(seed)
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            ref = next(a for p, a in self.answers.items() if p in text)
            rows = []
            for j in range(n):
                value = ref if j % 2 == 0 else f"{ref}9"
                rows.append((f"First I read the question {rng.randint(0, 999)}.\nAnswer: {value}", True))
            out.append(rows)
        return out


def _recipe(teacher_dir: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    recipe = tiny_recipe(teacher_dir, out / "unused.jsonl", out / "run")
    recipe["data"] = {"max_length": 96, "batch_size": 4}
    recipe["factory"] = {
        "tasks": TASKS,
        "samples": 2,
        "max_new_tokens": 12,
        "heldout": 0.25,
        "shard_size": 8,
        "output": str(out / "factory"),
    }
    recipe["method"] = {"name": "trace_sft"}
    recipe["baselines"] = [
        {"name": "trace_sft", "traces": "unfiltered", "label": "unfiltered"},
        {"name": "pairwise", "objective": "redi"},
        {"name": "step_by_step"},
        {"name": "trace_sft", "chunked": True, "label": "chunked"},
    ]
    recipe["train"] = {"steps": 2, "lr": 1e-3, "threads": 1}
    recipe["eval"] = {"batch_size": 8}
    recipe.update(overrides)
    return recipe


def test_factory_recipe_trains_every_view_and_reports_accuracy(
    tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    samplers: list[ReferenceSampler] = []

    def sampler(teacher: Any, cfg: Any, progress: Any = None) -> ReferenceSampler:
        samplers.append(ReferenceSampler(teacher.tokenizer))
        return samplers[-1]

    monkeypatch.setattr("distill.families.lm_reason.teacher_sampler", sampler)
    recipe = parse_recipe(_recipe(tiny_teacher_dir, tmp_path))
    summary = run_recipe(recipe)
    assert set(summary["methods"]) == {"trace_sft", "unfiltered", "pairwise", "step_by_step", "chunked"}
    keys = {c["key"] for c in summary["columns"]}
    assert {"accuracy", "accuracy/arithmetic", "accuracy/units", "mean_output_tokens"} <= keys
    for entry in summary["methods"].values():
        assert 0.0 <= entry["after"]["accuracy"] <= 1.0
    total = summary["factory"]["funnel"]["total"]
    assert total["generated"] == 2 * total["prompts"] and total["kept"] == total["prompts"]  # one right each
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Data factory" in report and "## Contamination check" in report
    heldout = [json.loads(line) for line in (tmp_path / "factory" / "heldout.jsonl").read_text().splitlines()]
    kept = (tmp_path / "factory" / "kept.jsonl").read_text()
    assert heldout and all(row["prompt"] not in kept for row in heldout)
    # a second run reuses the factory's folder: nothing is generated again
    run_recipe(parse_recipe(_recipe(tiny_teacher_dir, tmp_path, output_dir=str(tmp_path / "run2"))))
    assert samplers[-1].calls == 0


def test_factory_recipe_refuses_data_train_and_zero_samples(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    bad = _recipe(tiny_teacher_dir, tmp_path)
    bad["data"]["train"] = {"path": "x.jsonl"}
    with pytest.raises(RecipeError, match="data.train"):
        parse_recipe(bad)
    zero = _recipe(tiny_teacher_dir, tmp_path)
    zero["factory"]["samples"] = 0
    with pytest.raises(RecipeError, match="factory.samples"):
        parse_recipe(zero)
    assert_one_line_error(run_cli("validate", str(write(tmp_path, zero))), "factory.samples")


def test_unknown_verifier_in_prompt_file_is_one_line(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "1+1?", "answer": "2", "task": "t", "verifier": "numeric"}] * 3
    rows.append({"prompt": "2+2?", "answer": "4", "task": "t", "verifier": "numerc"})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = _recipe(tiny_teacher_dir, tmp_path)
    recipe["factory"] = {"prompts": str(prompts), "samples": 1, "output": str(tmp_path / "f")}
    assert_one_line_error(run_cli("factory", str(write(tmp_path, recipe))), "numerc", "line 4")
