"""Exact resume with the compression pieces in the checkpoint: a fake-quantized student (parametrized
weights), a projector module, LoRA adapters. A run cut back to its middle checkpoint and resumed exports
the same weights as the uninterrupted run. Each run is its own process, as after a real kill: within one
process a second run differs in the last bits (1e-9) even for plain logit_kd."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cli.test_errors import write
from tests.conftest import tiny_recipe

QAD_HIDDEN = {
    "name": "representation_kd",
    "hidden": {"layers": "all"},
    "quantize": {"bits": 4, "group_size": 16},
}


@pytest.mark.parametrize(
    ("method", "student"),
    [
        (QAD_HIDDEN, {"init": "prune", "prune": {"keep_layers": 2, "width": {"hidden_size": 16}}}),
        ({"name": "logit_kd"}, {"init": "prune", "prune": {"keep_layers": 2}, "lora": {"r": 4}}),
    ],
)
def test_cut_back_and_resumed_equals_uninterrupted(
    tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path, method: dict, student: dict
) -> None:
    rec = tiny_recipe(
        tiny_teacher_dir, prompts_file, tmp_path / "run", method=method, baselines=[], student=student
    )
    rec["train"] = {**rec["train"], "steps": 4, "checkpoint_every": 2}
    path = write(tmp_path, rec)
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # as the kill-and-resume test: separate processes
    subprocess.run(
        [sys.executable, "-m", "distill.cli", "run", str(path)], check=True, env=env, capture_output=True
    )
    folder = tmp_path / "run" / "methods" / method["name"]
    straight = load_file(folder / "student" / "model.safetensors")
    assert [c.name for c in (folder / "checkpoints").glob("step-*")] == ["step-00000002"]
    shutil.rmtree(folder / "student")  # as if killed between step 2 and step 4
    (folder / "eval.json").unlink()
    cmd = [sys.executable, "-m", "distill.cli", "run", str(path), "--resume"]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    summary = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert summary["methods"][method["name"]]["resumed_from"] == 2
    resumed = load_file(folder / "student" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
