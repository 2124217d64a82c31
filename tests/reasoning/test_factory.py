"""The data factory: the funnel adds up, the held-out split comes first and never leaks into training
files, a killed run resumes to the same bytes, changed settings or bad prompt rows stop it with one line,
the views hold what they promise; and the samplers (a fake server, the tiny live Llama)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from distill.configs.factory import FactoryConfig
from distill.errors import InputError
from distill.reasoning.factory import run_factory
from distill.reasoning.tasks import make_tasks, task_row
from distill.reasoning.verifiers import get_verifier
from distill.reasoning.views import (
    funnel_rows,
    heldout_examples,
    pair_examples,
    shortest_examples,
    unfiltered_examples,
    verified_examples,
)


class CharTokenizer:
    """Characters as token ids: no chat template, so a prompt's ids decode back to its text."""

    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


class FakeSampler:
    """Seeded texts per prompt: right answers, wrong ones, a fixed text that repeats, near-copies of one
    rationale, cut samples and answers without an `Answer:` line. Records the prompts it saw."""

    ident = "fake-teacher"

    def __init__(self, answers: dict[str, str], fail_after: int | None = None, folder: Path | None = None):
        self.answers, self.fail_after, self.folder = answers, fail_after, folder
        self.calls = 0
        self.seen: list[str] = []
        self.split_existed: list[bool] = []

    def sample(self, prompts: list[list[int]], n: int, seed: int) -> list[list[tuple[str, bool]]]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("killed")
        self.calls += 1
        if self.folder is not None:
            self.split_existed.append((self.folder / "split.json").exists())
        rng = random.Random(seed)
        out = []
        for ids in prompts:
            text = "".join(map(chr, ids)).strip()
            self.seen.append(text)
            ref = self.answers[text]
            out.append([self._one(rng, ref) for _ in range(n)])
        return out

    @staticmethod
    def _one(rng: random.Random, ref: str) -> tuple[str, bool]:
        kind = rng.choice(["right", "right", "wrong", "repeat", "near", "cut", "noline"])
        step = rng.randint(0, 10**6)
        if kind == "right":
            return f"Let me add the numbers carefully, step {step} of many.\nAnswer: {ref}", True
        if kind == "wrong":
            return f"I think it is about this much, guess {step}.\nAnswer: {int(ref) + 1}", True
        if kind == "repeat":
            return f"Easy.\nAnswer: {ref}", True
        if kind == "near":
            filler = " ".join(f"w{k}" for k in range(40))
            return f"{filler} variant{rng.randint(0, 1)}\nAnswer: {ref}", True
        if kind == "cut":
            return f"Let me add the numbers, step {step}.\nAnswer: {ref}", False
        return f"The result is {ref}, computed in step {step}.", True


def write_prompts(path: Path, n: int = 30) -> dict[str, str]:
    rows, answers = [], {}
    for i in range(n):
        task = "add" if i % 3 else "mul"
        a, b = 3 + i, 7 + 2 * i
        value = a + b if task == "add" else a * b
        prompt = f"Problem {i}: what is {a} {'+' if task == 'add' else '*'} {b}? Finish with a line `Answer: <answer>`."
        rows.append({"prompt": prompt, "answer": str(value), "task": task, "verifier": "numeric"})
        answers[prompt] = str(value)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return answers


def config(prompts: Path, out: Path, **over: Any) -> FactoryConfig:
    base: dict[str, Any] = {
        "prompts": str(prompts),
        "samples": 6,
        "shard_size": 4,
        "heldout": 0.2,
        "output": str(out),
        "max_pairs_per_prompt": 3,
    }
    return FactoryConfig.model_validate({**base, **over})


def run(cfg: FactoryConfig, sampler: FakeSampler, seed: int = 0) -> Any:
    return run_factory(cfg, sampler, CharTokenizer(), name="t", seed=seed)


def folder_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    prompts = tmp_path / "prompts.jsonl"
    return prompts, write_prompts(prompts)


def test_funnel_adds_up_and_kept_samples_are_right(
    tmp_path: Path, setup: tuple[Path, dict[str, str]]
) -> None:
    prompts, answers = setup
    out = run(config(prompts, tmp_path / "f"), FakeSampler(answers))
    m = out.manifest
    total, drops = m["funnel"]["total"], m["drops"]["total"]
    n_train = m["split"]["train"]
    assert total["prompts"] == n_train and total["generated"] == 6 * n_train

    def dropped(prefix: str) -> int:
        return sum(v for k, v in drops.items() if k.startswith(prefix))

    assert dropped("verify:") > 0 and dropped("dedup:") > 0 and dropped("filter:") > 0
    assert total["generated"] - total["verified"] == dropped("verify:")
    assert total["verified"] - total["deduplicated"] == dropped("dedup:")
    assert total["deduplicated"] - total["kept"] == dropped("filter:")
    assert set(drops) >= {"verify: wrong", "dedup: exact", "dedup: near", "filter: unfinished"}
    for stage in total:  # per-task counts sum to the total
        assert sum(c[stage] for c in m["funnel"]["tasks"].values()) == total[stage]
    kept = verified_examples(out)
    assert len(kept) == total["kept"] > 0
    numeric = get_verifier("numeric", "test")
    for ex in kept:
        assert ex.finished and numeric.verify(ex.completion or "", ex.meta["answer"], {}).correct
    texts = [(ex.meta["index"], " ".join((ex.completion or "").split())) for ex in kept]
    assert len(set(texts)) == len(texts)  # no exact duplicates within a prompt
    assert len(unfiltered_examples(out)) == total["generated"]
    rows = funnel_rows(m)
    assert rows[-1]["task"] == "total" and rows[-1]["kept"] == total["kept"]
    assert {r["task"] for r in rows[:-1]} == {"add", "mul"}
    assert set(m["files"]) >= {"split.json", "verified.jsonl", "kept.jsonl", "samples/shard-00000.jsonl"}
    for name, digest in m["files"].items():
        assert hashlib.sha256((out.folder / name).read_bytes()).hexdigest() == digest


def test_split_comes_first_and_heldout_prompts_never_reach_training_files(
    tmp_path: Path, setup: tuple[Path, dict[str, str]]
) -> None:
    prompts, answers = setup
    folder = tmp_path / "f"
    sampler = FakeSampler(answers, folder=folder)
    out = run(config(prompts, folder), sampler)
    split = json.loads((folder / "split.json").read_text())
    assert sampler.split_existed and all(sampler.split_existed)
    assert sorted(split["train"] + split["heldout"]) == list(range(30))
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    held = {rows[i]["prompt"] for i in split["heldout"]}
    by_task = {t: sum(r["task"] == t for r in rows) for t in ("add", "mul")}
    for task, n in by_task.items():  # stratified: round(0.2 * n) of each task
        assert sum(rows[i]["task"] == task for i in split["heldout"]) == round(0.2 * n)
    assert held.isdisjoint(sampler.seen)
    for name in ("verified.jsonl", "kept.jsonl", "unfiltered.jsonl", "pairs.jsonl"):
        text = (folder / name).read_text()
        assert not any(json.dumps(p)[1:-1] in text for p in held), name
    assert {ex.prompt[0]["content"] for ex in heldout_examples(out)} == held
    for ex in heldout_examples(out):
        assert ex.completion is None and ex.meta["verifier"] == "numeric" and ex.meta["answer"]
    assert out.manifest["contamination"]["heldout_prompts"] == len(held)


def test_killed_run_resumes_to_the_same_bytes(tmp_path: Path, setup: tuple[Path, dict[str, str]]) -> None:
    prompts, answers = setup
    straight = run(config(prompts, tmp_path / "a"), FakeSampler(answers))
    n_shards = len(list((straight.folder / "samples").glob("shard-*.jsonl")))
    assert n_shards >= 4
    with pytest.raises(RuntimeError, match="killed"):
        run(config(prompts, tmp_path / "b"), FakeSampler(answers, fail_after=2))
    assert len(list((tmp_path / "b" / "samples").glob("shard-*.jsonl"))) == 2
    again = FakeSampler(answers)
    resumed = run(config(prompts, tmp_path / "b"), again)
    assert again.calls == n_shards - 2
    a, b = folder_hashes(straight.folder), folder_hashes(resumed.folder)
    for volatile in ("manifest.json", "timings.json"):
        a.pop(volatile), b.pop(volatile)
    assert a == b
    ma, mb = straight.manifest, resumed.manifest
    for m in (ma, mb):
        m.pop("timings"), m["config"].pop("output")
    assert ma == mb
    assert again.calls == n_shards - 2
    third = FakeSampler(answers)
    run(config(prompts, tmp_path / "b"), third)  # all on disk: nothing is sampled again
    assert third.calls == 0


def test_changed_settings_on_resume_stop_with_one_line(
    tmp_path: Path, setup: tuple[Path, dict[str, str]]
) -> None:
    prompts, answers = setup
    run(config(prompts, tmp_path / "f"), FakeSampler(answers))
    before = folder_hashes(tmp_path / "f")
    for cfg, seed in (
        (config(prompts, tmp_path / "f", temperature=0.5), 0),
        (config(prompts, tmp_path / "f"), 1),
    ):
        with pytest.raises(InputError) as err:
            run(cfg, FakeSampler(answers), seed=seed)
        assert "factory.output" in str(err.value) and "\n" not in str(err.value)
    assert folder_hashes(tmp_path / "f") == before
    # batch size and the output path are not part of what makes the data
    run(config(prompts, tmp_path / "f", batch_size=3), FakeSampler(answers))
    # filters are re-applied to the stored samples: nothing is sampled again, the kept set changes
    kept_before = (tmp_path / "f" / "kept.jsonl").read_text()
    again = FakeSampler(answers)
    run(config(prompts, tmp_path / "f", filters={"require_answer": False, "require_finished": False}), again)
    assert again.calls == 0
    assert (tmp_path / "f" / "kept.jsonl").read_text() != kept_before


def test_bad_prompt_rows_name_file_and_line(tmp_path: Path, setup: tuple[Path, dict[str, str]]) -> None:
    prompts, answers = setup
    run(config(prompts, tmp_path / "f"), FakeSampler(answers))
    before = folder_hashes(tmp_path / "f")
    lines = prompts.read_text().splitlines()
    typo = json.loads(lines[2])
    typo["verifier"] = "numerik"
    prompts.write_text("\n".join([*lines[:2], json.dumps(typo), *lines[3:]]) + "\n")
    with pytest.raises(InputError, match=rf"{prompts} line 3: unknown verifier 'numerik'"):
        run(config(prompts, tmp_path / "f"), FakeSampler(answers))
    assert folder_hashes(tmp_path / "f") == before
    del typo["verifier"], typo["answer"]
    prompts.write_text("\n".join([*lines[:4], json.dumps(typo), *lines[4:]]) + "\n")
    with pytest.raises(InputError, match=rf"{prompts} line 5: .*needs 'answer'"):
        run(config(prompts, tmp_path / "g"), FakeSampler(answers))
    prompts.write_text(
        "\n".join([*lines[:1], '{"prompt": "x", "answer": "not a number", "verifier": "numeric"}'])
    )
    with pytest.raises(InputError, match=rf"{prompts} line 2: answer"):
        run(config(prompts, tmp_path / "h"), FakeSampler(answers))
    assert not (tmp_path / "g").exists() and not (tmp_path / "h").exists()
    with pytest.raises(ValidationError, match="samples"):
        config(prompts, tmp_path / "i", samples=0)
    with pytest.raises(ValidationError, match="exactly one of prompts"):
        FactoryConfig.model_validate({"prompts": str(prompts), "tasks": [{"name": "arithmetic", "count": 2}]})


def test_views_pairs_and_shortest(tmp_path: Path, setup: tuple[Path, dict[str, str]]) -> None:
    prompts, answers = setup
    out = run(config(prompts, tmp_path / "f"), FakeSampler(answers))
    numeric = get_verifier("numeric", "test")
    pairs = pair_examples(out)
    assert pairs
    per_prompt: dict[str, int] = {}
    for chosen, rejected in pairs:
        assert chosen.prompt == rejected.prompt
        ref = answers[chosen.prompt[0]["content"]]
        assert numeric.verify(chosen.completion or "", ref, {}).correct
        assert not numeric.verify(rejected.completion or "", ref, {}).correct
        per_prompt[chosen.prompt[0]["content"]] = per_prompt.get(chosen.prompt[0]["content"], 0) + 1
    assert max(per_prompt.values()) <= 3
    kept = verified_examples(out)
    shortest = shortest_examples(out)
    assert len(shortest) == len({ex.meta["index"] for ex in kept})
    for ex in shortest:
        same = [len(k.completion or "") for k in kept if k.meta["index"] == ex.meta["index"]]
        assert len(ex.completion or "") == min(same)


def test_teacher_heldout_accuracy_and_generated_tasks(tmp_path: Path) -> None:
    items = make_tasks("arithmetic", 10, seed=0)
    answers = {it.prompt: it.answer for it in items}
    cfg = FactoryConfig.model_validate(
        {
            "tasks": [{"name": "arithmetic", "count": 10}],
            "samples": 2,
            "heldout_samples": 3,
            "output": str(tmp_path / "f"),
        }
    )
    sampler = FakeSampler(answers)
    out = run(cfg, sampler)
    acc = out.manifest["teacher_heldout"]["total"]
    assert acc["samples"] == 3 * out.manifest["split"]["heldout"] == 6
    assert 0 <= acc["correct"] <= acc["samples"]
    held = {ex.prompt[0]["content"] for ex in heldout_examples(out)}
    assert held <= set(sampler.seen)  # sampled for the teacher's accuracy, but not in any training file
    assert not any(json.dumps(p)[1:-1] in (out.folder / "kept.jsonl").read_text() for p in held)
    bad = FactoryConfig.model_validate(
        {"tasks": [{"name": "arithmetc", "count": 2}], "output": str(tmp_path / "g")}
    )
    with pytest.raises(InputError, match="factory.tasks"):
        run(bad, FakeSampler({}))


def test_served_sampler_gives_each_sample_its_own_seed() -> None:
    from types import SimpleNamespace

    from distill.reasoning.teacher_samples import served_sampler

    seeds: list[tuple[int, int]] = []

    class Remote:
        def generate(
            self, prompts: list[list[int]], max_new: int, t: float, p: float, seed: int
        ) -> list[Any]:
            out = []
            for i, ids in enumerate(prompts):
                seeds.append((ids[0], seed + i))
                out.append(SimpleNamespace(text=f" s{seed + i} ", finished=i % 2 == 0))
            return out

    teacher = SimpleNamespace(kind="served", ident="srv", remote=Remote(), model=None, tokenizer=None)
    cfg = FactoryConfig.model_validate({"tasks": [{"name": "arithmetic", "count": 1}]})
    sampler = served_sampler(teacher, cfg)  # type: ignore[arg-type]
    got = sampler.sample([[5], [6], [7]], 4, seed=100)
    assert [len(g) for g in got] == [4, 4, 4]
    assert len({s for _, s in seeds}) == 12  # no two samples share a seed
    assert got[0][0] == ("s100", True) and got[1][0] == ("s101", False)
    assert "srv" in sampler.ident


def test_live_sampler_on_a_tiny_llama(smol_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    from distill.data.tokenize import prompt_ids
    from distill.reasoning.teacher_samples import live_sampler
    from distill.teachers.factory import TeacherHandle
    from tests.conftest import tiny_llama

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    teacher = TeacherHandle("live", "tiny", tok, tiny_llama(layers=2, hidden=32), None)
    cfg = FactoryConfig.model_validate({"tasks": [{"name": "arithmetic", "count": 1}], "max_new_tokens": 5})
    sampler = live_sampler(teacher, cfg)
    ids = [
        prompt_ids(tok, [{"role": "user", "content": q}], None) for q in ("What is 2 + 2?", "Name a fruit.")
    ]
    first = sampler.sample(ids, 3, seed=7)
    assert [len(s) for s in first] == [3, 3]
    assert all(isinstance(t, str) and isinstance(f, bool) for s in first for t, f in s)
    assert sampler.sample(ids, 3, seed=7) == first
    assert len({t for s in first for t, _ in s}) > 1  # samples differ
    assert "live:tiny" in sampler.ident


def test_programs_that_crash_or_loop_are_failed_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = make_tasks("programs", 3, seed=0)
    prompts = tmp_path / "programs.jsonl"
    prompts.write_text("".join(json.dumps(task_row(it)) + "\n" for it in items))
    refs = {it.prompt: it.options["reference"] for it in items}

    class ProgramSampler(FakeSampler):
        def sample(self, prompts: list[list[int]], n: int, seed: int) -> list[list[tuple[str, bool]]]:
            self.calls += 1
            out = []
            for k, ids in enumerate(prompts):
                ref = refs["".join(map(chr, ids)).strip()]
                loop = "while True:\n    pass" if k == 0 and self.calls == 1 else "raise SystemExit(4)"
                out.append(
                    [(f"```python\n{ref}```\nAnswer: f", True), (f"```python\n{loop}\n```\nAnswer: f", True)]
                )
            return out

    limits = {"cpu_s": 1, "wall_s": 5}
    cfg = config(prompts, tmp_path / "f", samples=2, sandbox=limits, allow_unisolated=True)
    out = run(cfg, ProgramSampler({}))
    total, drops = out.manifest["funnel"]["total"], out.manifest["drops"]["total"]
    assert total["generated"] == 4 and total["verified"] == total["kept"] == 2
    assert sum(drops.values()) == 2 and any(k in drops for k in ("verify: cpu", "verify: timeout"))
    before = folder_hashes(out.folder)

    def no_runs(*args: object) -> None:
        raise AssertionError("a resumed run re-ran a program")

    monkeypatch.setattr("distill.reasoning.verifiers.ProgramVerifier.verify", no_runs)
    run(cfg, ProgramSampler({}))  # every shard verified already: no program runs again
    after = folder_hashes(out.folder)
    assert {k: v for k, v in after.items() if k != "timings.json"} == {
        k: v for k, v in before.items() if k != "timings.json"
    }
