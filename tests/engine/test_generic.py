"""The engine through the real `train()` with methods of no shipped family: a plain nn.Module classifier
on image-shaped batches, a two-group / two-phase method that is SIGKILLed and resumes bit-identically,
an EMA kept in the method's checkpointed state, and resume falling back past a damaged checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.engine.trainer import train
from distill.errors import InputError
from distill.recipe import TrainConfig
from tests.conftest import kill_after_first_checkpoint
from tests.engine.toy_methods import ClassifierKD, ImageStream, small_cnn, toy_images
from tests.engine.toy_run import run

ROOT = Path(__file__).resolve().parents[2]


def test_engine_imports_no_model_library() -> None:
    code = "import sys, distill.engine.trainer; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_plain_module_classifier_trains(tmp_path: Path) -> None:
    x, y = toy_images(dtype=torch.float32)
    method = ClassifierKD(small_cnn(1, dtype=torch.float32), small_cnn(2, width=8, dtype=torch.float32))
    stream = ImageStream(x, y, 16, seed=0)
    cfg = TrainConfig(steps=60, lr=3e-2, schedule="constant")
    result = train(method=method, stream=stream, cfg=cfg, out_dir=tmp_path, seed=0)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and rows[0]["samples"] == 16 and rows[0]["loss_units"] == 16
    first, last = sum(r["ce"] for r in rows[:5]) / 5, sum(r["ce"] for r in rows[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    with torch.no_grad():
        accuracy = float((method.student(x).argmax(-1) == y).double().mean())
    assert accuracy > 0.9 and result.steps == 60


def test_two_phase_method_sigkill_resume_is_bit_identical(tmp_path: Path) -> None:
    straight = run("two_phase", tmp_path / "straight", 30, 4, resume=False)
    rows = [json.loads(r) for r in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert {"critic/loss", "generator/loss", "critic/lr", "generator/lr"} <= rows[0].keys()
    assert rows[0]["samples"] == 4 * 8  # three critic updates and one generator update, 8 images each

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tests.engine.toy_run", "two_phase", str(killed), "30", "4"]
    kill_after_first_checkpoint(cmd, killed / "checkpoints", cwd=ROOT)
    assert not (killed / "final.safetensors").exists(), "run finished before the kill"
    subprocess.run([*cmd, "--resume"], cwd=ROOT, check=True, capture_output=True)
    assert 4 <= int((killed / "resumed_from.txt").read_text()) < 30
    resumed = load_file(killed / "final.safetensors")
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    rows_b = [json.loads(r) for r in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["critic/loss"] for r in rows_b] == [r["critic/loss"] for r in rows]
    state = torch.load(
        sorted((killed / "checkpoints").glob("step-*"))[-1] / "trainer_state.pt", weights_only=True
    )
    step = state["step"]
    assert state["optimizers"]["critic"]["state"][0]["step"] == 3 * step
    assert state["optimizers"]["generator"]["state"][0]["step"] == step


def test_ema_state_is_checkpointed_and_resumed(tmp_path: Path) -> None:
    straight = run("ema", tmp_path / "straight", 9, 4, resume=False)
    resumed_dir = tmp_path / "resumed"
    run("ema", resumed_dir, 9, 4, resume=False)
    last = sorted((resumed_dir / "checkpoints").glob("step-*"))[-1]
    state = torch.load(last / "trainer_state.pt", weights_only=True)
    assert state["step"] == 8 and "0.weight" in state["method"]["ema"]
    resumed = run("ema", resumed_dir, 9, 4, resume=True)
    assert (resumed_dir / "resumed_from.txt").read_text() == "8"
    assert any(k.startswith("ema.") for k in resumed)
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path: Path) -> None:
    straight = run("classifier", tmp_path / "straight", 7, 2, resume=False)
    out = tmp_path / "damaged"
    run("classifier", out, 7, 2, resume=False)
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-00000004", "step-00000006"]
    weights = ckpts[-1] / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    resumed = run("classifier", out, 7, 2, resume=True)
    assert (out / "resumed_from.txt").read_text() == "4"
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    for ckpt in sorted((out / "checkpoints").glob("step-*")):
        (ckpt / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.raises(InputError, match="no intact checkpoint"):
        run("classifier", out, 7, 2, resume=True)


def test_a_finished_training_leaves_nothing_on_the_shared_accelerator(tmp_path: Path) -> None:
    """run_recipe trains every method and seed on one accelerator: an earlier student and its optimizer
    state must be collectable once its run is over, or memory grows with every method."""
    import gc
    import weakref

    from distill.engine.accelerator import make_accelerator

    x, y = toy_images(dtype=torch.float32)
    cfg = TrainConfig(steps=2, lr=1e-2, schedule="constant")
    acc = make_accelerator(cfg, tmp_path)
    dead = []
    for i in range(2):
        method = ClassifierKD(small_cnn(1, dtype=torch.float32), small_cnn(2, width=8, dtype=torch.float32))
        train(method=method, stream=ImageStream(x, y, 16, seed=0), cfg=cfg, out_dir=tmp_path / str(i), seed=0,
              accelerator=acc)  # fmt: skip
        dead.append(weakref.ref(method.student))
        del method
    gc.collect()
    assert dead[0]() is None and dead[1]() is None
    assert acc._models == [] and acc._optimizers == []
