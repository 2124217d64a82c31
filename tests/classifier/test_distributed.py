"""A classifier feature method under `torchrun` on 2 CPU processes: hooks fire through the DDP wrapper,
projectors synchronise through their own forward, and the final student equals a 1-process run with the
same global batch (float32, so up to reduction-order rounding)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from distill.classifier.models import build_model, model_config
from tests.classifier.recipes import digits_recipe

ROOT = Path(__file__).resolve().parents[2]


def _teacher(folder: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("cnn", [1, 8, 8], 10, {"width": 8})
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model_config(model)))
    return folder


def _recipe(tmp_path: Path, name: str, batch_size: int, teacher: Path) -> Path:
    method = {"name": "fitnet", "kd_weight": 1.0, "pairs": [{"student": "layers.0", "teacher": "block1"}]}
    rec = digits_recipe(tmp_path / name, method, name=name)
    rec["teacher"] = {"model": {"arch": "cnn"}, "path": str(teacher)}
    rec["data"]["batch_size"] = batch_size
    rec["train"].update({"steps": 8, "threads": 1})
    rec["eval"] = {"every": 0, "before": False}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "teacher")
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "distill.cli", "run", str(_recipe(tmp_path, "one", 32, teacher))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "distill.cli",
    ]
    two = subprocess.run([*torchrun, "run", str(_recipe(tmp_path, "two", 16, teacher))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    a = load_file(tmp_path / "one" / "run" / "methods" / "fitnet" / "student" / "model.safetensors")
    b = load_file(tmp_path / "two" / "run" / "methods" / "fitnet" / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
