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
