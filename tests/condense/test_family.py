"""Dataset distillation end to end on sklearn digits (real data) with tiny budgets: every method runs on
the engine, the controls and DD-Ranking columns appear, the set exports as safetensors and as Parquet
that `datasets` loads, a killed distillation resumes to the same set bit for bit, and bad input gives
one line."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from distill.engine.trainer import train
from distill.errors import DistillError, RecipeError
from distill.families.condense import CondenseFamily
from distill.pipeline import run_recipe
from distill.progress import NullProgress
from distill.recipe import parse_recipe
from distill.recipe_base import TrainConfig
from tests.cli.test_errors import assert_one_line_error, run_cli, write


def recipe(tmp_path: Path, method: dict[str, Any], **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "test-condense",
        "output_dir": str(tmp_path / "run"),
        "data": {"kind": "digits"},
        "synthetic": {"ipc": 1, "image_lr": 0.05},
        "network": {"arch": "cnn", "options": {"width": 8}},
        "method": method,
        "train": {"steps": 4, "lr": 0.01, "threads": 1, "max_grad_norm": None},
        "eval": {
            "seeds": 2,
            "epochs": 20,
            "full_epochs": 2,
            "archs": [{"arch": "cnn", "options": {"width": 8}}, {"arch": "mlp", "options": {"hidden": [32]}}],
        },
    }
    data.update(extra)
    return data


def test_every_method_runs_with_controls_and_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # MTT's experts go under runs/.experts
    baselines = [
        {"name": "random"}, {"name": "herding"}, {"name": "dq", "bins": 1}, {"name": "dc", "inner_steps": 1},
        {"name": "datadam"}, {"name": "mtt", "experts": 1, "expert_epochs_total": 3, "max_start_epoch": 1, "syn_steps": 3},
        {"name": "sre2l"},
    ]  # fmt: skip
    teacher = {
        "model": {"arch": "cnn", "options": {"width": 8}},
        "steps": 30,
        "store": str(tmp_path / "teachers"),
    }
    summary = run_recipe(parse_recipe(recipe(tmp_path, {"name": "dm"}, baselines=baselines, teacher=teacher)))
    refs = summary["references"]
    assert {"full data (hard labels)", "random 1/class (hard labels)"} <= set(refs)
    for label in ["dm", *(b["name"] for b in baselines)]:
        after = summary["methods"][label]["after"]
        assert 0.0 <= after["accuracy"] <= 1.0 and "accuracy_mlp" in after and "ior" in after, label
    # the random method is the random control: same rows, same protocol, so the same accuracy
    assert (
        summary["methods"]["random"]["after"]["accuracy"] == refs["random 1/class (hard labels)"]["accuracy"]
    )
    assert summary["methods"]["random"]["after"]["ior"] == 0.0
    assert summary["methods"]["mtt"]["after"]["learned_lr"] > 0
    assert (tmp_path / "run" / "synthetic_sets.png").stat().st_size > 1000
    assert "synthetic_sets.png" in (tmp_path / "run" / "report.md").read_text()
    folder = tmp_path / "run" / "methods" / "dm" / "student"
    tensors = load_file(str(folder / "synthetic.safetensors"))
    assert tensors["images"].shape == (10, 1, 8, 8) and tensors["labels"].tolist() == list(range(10))
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(folder / "synthetic.parquet"), split="train")
    assert len(ds) == 10 and ds[3]["label"] == 3
    assert torch.tensor(ds[3]["image"]).shape == (1, 8, 8)


def test_killed_distillation_resumes_to_the_same_set(tmp_path: Path) -> None:
    """DM draws a network and an augmentation per step from the checkpointed RNG: a run killed after its
    step-3 checkpoint and resumed ends with the uninterrupted run's images, bit for bit."""
    r = parse_recipe(recipe(tmp_path, {"name": "dm"}, eval={"seeds": 1, "epochs": 1, "full_epochs": 1}))
    family = CondenseFamily()
    family.rows = None  # type: ignore[assignment]
    from accelerate import Accelerator

    family.prepare(r, Accelerator(cpu=True), NullProgress())
    cfg = TrainConfig(steps=6, lr=0.01, max_grad_norm=None, checkpoint_every=3)

    def run(out: Path, resume: bool) -> torch.Tensor:
        method = family.make_method(r.method, 0)
        train(
            method=method, stream=family.make_stream(method, 0), cfg=cfg, out_dir=out, seed=0, resume=resume
        )
        return method.modules()["images"].images.detach().clone()  # type: ignore[union-attr]

    whole = run(tmp_path / "a", False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for ckpt in (tmp_path / "b" / "checkpoints").iterdir():
        if not ckpt.name.endswith("3"):
            shutil.rmtree(ckpt)
    assert torch.equal(whole, run(tmp_path / "b", True))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"eval": {"archs": [{"arch": "convnext"}]}}, "eval.archs.0.arch"),
        ({"method": {"name": "sre2l"}}, "add a teacher section"),
        ({"method": {"name": "mtt", "max_start_epoch": 9}}, "max_start_epoch"),
    ],
)
def test_recipe_refusals(tmp_path: Path, change: dict[str, Any], needle: str) -> None:
    data = recipe(tmp_path, {"name": "dm"})
    data.update(change)
    with pytest.raises(RecipeError, match=needle):
        parse_recipe(data)


def test_ipc_larger_than_a_class(tmp_path: Path) -> None:
    res = run_cli("run", str(write(tmp_path, recipe(tmp_path, {"name": "random"}, synthetic={"ipc": 500}))))
    assert_one_line_error(res, "synthetic.ipc", "500")


def test_image_folder_with_a_missing_label(tmp_path: Path) -> None:
    from datasets import Dataset

    Dataset.from_dict({"image": [[[0.0] * 4] * 4] * 3, "label": [0, None, 1]}).save_to_disk(
        str(tmp_path / "ds")
    )
    data = recipe(
        tmp_path, {"name": "random"}, data={"kind": "images", "path": str(tmp_path / "ds"), "image_size": 4}
    )
    res = run_cli("run", str(write(tmp_path, data)))
    assert_one_line_error(res, "ds")


def test_cli_error_is_a_distill_error(tmp_path: Path) -> None:
    assert issubclass(RecipeError, DistillError)


def test_distill_eval_scores_a_saved_set_like_the_run(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    data = recipe(tmp_path, {"name": "herding"}, eval={"seeds": 1, "epochs": 10, "full_epochs": 1})
    summary = run_recipe(parse_recipe(data))
    path = write(tmp_path, data)
    folder = tmp_path / "run" / "methods" / "herding" / "student"
    res = subprocess.run([sys.executable, "-m", "distill.cli", "eval", str(path), "--student", str(folder)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    saved = json.loads((folder / "eval.standalone.json").read_text())
    assert saved["accuracy"] == summary["methods"]["herding"]["after"]["accuracy"]
    assert_one_line_error(
        run_cli("eval", str(path), "--student", str(tmp_path)), "--student", "synthetic.safetensors"
    )
