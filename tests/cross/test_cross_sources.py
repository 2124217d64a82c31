"""Cross-tokenizer KD from a cached teacher (written by `distill cache` in the teacher's tokens), and exact
resume of a cross-tokenizer run (each run its own process, as after a real kill)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.cli.test_errors import write
from tests.cross.test_cross_run import cross_recipe

ENV = {**os.environ, "PYTHONHASHSEED": "0"}


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "distill.cli", *args], check=True, env=ENV, capture_output=True)


def answered(tmp_path: Path) -> Path:
    """Prompts with fixed answers, so the cached run needs no teacher generation."""
    path = tmp_path / "answered.jsonl"
    rows = [
        {"prompt": f"What is {i} plus {i + 1}?", "completion": f"{i} + {i + 1} = {2 * i + 1}. Done, naïve ✓"}
        for i in range(16)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cached_teacher(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    rec = cross_recipe(tiny_teacher_dir, answered(tmp_path), tmp_path / "run", uld_weight=0.5)
    rec["data"].pop("generate")
    rec["baselines"] = []
    rec["cache"] = {"path": str(tmp_path / "cache"), "k": 16}
    cli("cache", str(write(tmp_path, rec)))
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["vocab_size"] == 49152  # the teacher's vocabulary, not the student's 300
    rec["teacher"] = {
        "kind": "cache",
        "path": str(tmp_path / "cache"),
        "tokenizer": {"path": str(tiny_teacher_dir)},
    }
    cli("run", str(write(tmp_path, rec)))
    rows = [
        json.loads(x)
        for x in (tmp_path / "run" / "methods" / "cross_tokenizer_kd" / "metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    steps = [r for r in rows if "alm" in r]
    assert len(steps) == rec["train"]["steps"] and all(r["alm"] >= 0 and r["uld"] >= 0 for r in steps)
    summary = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert summary["methods"]["cross_tokenizer_kd"]["after"]["bits_per_byte"] > 0


def test_cut_back_and_resumed_equals_uninterrupted(
    tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path
) -> None:
    rec = cross_recipe(tiny_teacher_dir, prompts_file, tmp_path / "run", ce_weight=0.5)
    rec["baselines"] = []
    rec["train"] = {**rec["train"], "steps": 4, "checkpoint_every": 2}
    path = write(tmp_path, rec)
    cli("run", str(path))
    folder = tmp_path / "run" / "methods" / "cross_tokenizer_kd"
    straight = load_file(folder / "student" / "model.safetensors")
    shutil.rmtree(folder / "student")  # as if killed between step 2 and step 4
    (folder / "eval.json").unlink()
    cli("run", str(path), "--resume")
    summary = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert summary["methods"]["cross_tokenizer_kd"]["resumed_from"] == 2
    resumed = load_file(folder / "student" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_served_teacher_step_through_http() -> None:
    """A served teacher (top-k log-probs over HTTP, here the fake OpenAI-compatible server of the served
    tests) scores the teacher's tokens of a cross-tokenizer batch; the step trains the student."""
    from distill.configs.lm import CrossTokenizerKDConfig
    from distill.data.alignment import Chunk
    from distill.data.cross_tokenizer import PairedExample, collate_pairs
    from distill.data.tokenize import TokenizedExample
    from distill.methods.base import Phase, StepContext
    from distill.methods.lm.base import LMContext
    from distill.methods.lm.cross_tokenizer_kd import CrossTokenizerKD
    from distill.teachers.served_source import ServedTeacherSource
    from tests.conftest import tiny_llama
    from tests.teachers.test_served import FakeServer, FakeTokenizer, served_cfg

    pairs = [
        PairedExample(
            [5, 6, 7, 8, 9, 10],
            3,
            TokenizedExample([100, 200, 300, 400, 500], 2),
            [Chunk(0, 2, 0, 1), Chunk(2, 3, 1, 3)],
            9,
        ),
        PairedExample([5, 6, 11, 12], 2, TokenizedExample([100, 700, 800, 900], 2), [Chunk(0, 2, 0, 2)], 4),
    ]
    batch = collate_pairs(pairs, [[0], [1]], 0, 0)
    student = tiny_llama(vocab=300, layers=1)
    with FakeServer(["ok"] * 8) as fake:
        source = ServedTeacherSource(served_cfg(fake.url), tokenizer=FakeTokenizer())
        cfg = CrossTokenizerKDConfig(uld_weight=0.5, ce_weight=0.1)
        method = CrossTokenizerKD(cfg, LMContext(student, source, 300, chunk_size=4))
        ctx = StepContext(method.modules(), float(batch.num_loss_tokens), Phase(), 0, torch.device("cpu"))
        loss, parts = method.loss(ctx, batch)
        source.close()
    assert batch.num_chunks == 3 and torch.isfinite(loss) and parts["alm"] > 0 and parts["uld"] > 0
    loss.backward()
    assert student.model.embed_tokens.weight.grad is not None
