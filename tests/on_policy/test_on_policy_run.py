"""`distill run` with the sampling methods on the tiny teacher: each trains, logs its generated tokens,
exports a student; a cached teacher is one line naming teacher.kind."""

from __future__ import annotations

import json
from pathlib import Path

from distill.pipeline import run_recipe
from distill.recipe import parse_recipe
from tests.cli.test_errors import assert_one_line_error, run_cli, write
from tests.conftest import tiny_recipe


def test_on_policy_drafter_and_minillm_train_and_log_generated_tokens(
    tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path
) -> None:
    sample = {"max_new_tokens": 5}
    rec = tiny_recipe(
        tiny_teacher_dir,
        prompts_file,
        tmp_path / "run",
        method={"name": "on_policy", "lmbda": 0.5, "sample": sample},
        baselines=[
            {"name": "drafter", "selective": 0.2, "sample": sample},
            {"name": "minillm", "sample": sample},
        ],
    )
    rec["eval"]["own_samples"] = {"max_new_tokens": 4}
    summary = run_recipe(parse_recipe(rec))  # off-policy batches: the teacher's generated answers
    for name in ("on_policy", "drafter", "minillm"):
        mdir = tmp_path / "run" / "methods" / name
        assert (mdir / "student" / "model.safetensors").is_file()
        rows = [json.loads(x) for x in (mdir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        on = sum(r["on_policy_batches"] for r in rows if "on_policy_batches" in r)
        gen = sum(r.get("generated_tokens", 0) for r in rows)
        if name == "on_policy":
            assert 0 <= on <= 4
        else:
            assert on == 4 and gen > 0
        after = summary["methods"][name]["after"]
        assert after["kl"] >= 0 and after["own_kl"] >= 0 and after["own_tokens"] > 0
    assert "KL on own samples" in (tmp_path / "run" / "report.md").read_text()


def test_a_drafter_trains_on_prompts_alone(
    tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path
) -> None:
    rec = tiny_recipe(
        tiny_teacher_dir,
        prompts_file,
        tmp_path / "run",
        method={"name": "drafter", "sample": {"max_new_tokens": 4}},
    )
    rec["baselines"] = []
    rec["data"].pop("generate")
    rec["data"].pop("eval")
    run_recipe(parse_recipe(rec))
    rows = [
        json.loads(x)
        for x in (tmp_path / "run" / "methods" / "drafter" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4 and all(
        r["generated_tokens"] > 0 and r["loss_units"] == r["generated_tokens"] for r in rows
    )


def test_cached_teacher_is_one_line(tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path) -> None:
    rec = tiny_recipe(
        tiny_teacher_dir, prompts_file, tmp_path / "run", method={"name": "on_policy"}, baselines=[]
    )
    rec["data"].pop("generate")
    rec["teacher"] = {"kind": "cache", "path": str(tmp_path)}
    assert_one_line_error(run_cli("run", str(write(tmp_path, rec))), "teacher.kind", "on_policy")
