"""Classifier methods on the engine: feature methods read modules through hooks on two architecture
pairs (CNN -> MLP, CNN -> tiny ViT) with no change to model code; projectors and exit branches train with
the student and stay out of the export; a killed run resumes to the same weights."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.classifier.augment import Augment
from distill.classifier.batches import TensorStream
from distill.classifier.models import build_model, model_config
from distill.configs import METHOD_CONFIGS
from distill.engine.trainer import train
from distill.methods import classifier as _registers  # noqa: F401
from distill.methods.base import METHODS
from distill.methods.classifier.base import ClassifierContext, ClassifierMethod, TeacherNet
from distill.recipe_base import TrainConfig

IN_SHAPE = [1, 8, 8]
STUDENTS = {"mlp": {"hidden": [32, 16]}, "vit": {"dim": 16, "depth": 2, "heads": 2}}
PAIRS = {"mlp": [{"student": "layers.0", "teacher": "block2"}, {"student": "layers.1", "teacher": "block1"}],
         "vit": [{"student": "blocks.1", "teacher": "block1"}]}  # fmt: skip


def data(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *IN_SHAPE, generator=g), torch.arange(n) % 10


def make(name: str, arch: str, **cfg: Any) -> ClassifierMethod:
    torch.manual_seed(0)
    teacher = TeacherNet([build_model("cnn", IN_SHAPE, 10, {"width": 8})])
    student = build_model(arch, IN_SHAPE, 10, STUDENTS[arch])
    ctx = ClassifierContext(student=student, teacher=teacher, classes=10, spec=model_config(student))
    method = METHODS.get(name)(ctx, METHOD_CONFIGS.get(name)(name=name, **cfg))  # type: ignore[call-arg]
    assert isinstance(method, ClassifierMethod)
    return method


def run(method: ClassifierMethod, out: Path, steps: int = 3, **train_cfg: Any) -> None:
    x, y = data()
    cfg = TrainConfig(steps=steps, lr=0.01, max_grad_norm=None, **train_cfg)
    train(method=method, stream=TensorStream(x, y, torch.arange(len(y)), 16, 0), cfg=cfg, out_dir=out, seed=0)


CASES = [
    *((m, "mlp", {"pairs": PAIRS["mlp"]}) for m in ("fitnet", "rkd", "pkt", "nd")),
    ("crd", "mlp", {"pairs": PAIRS["mlp"], "memory_size": 32, "embed_dim": 8}),
    *((m, "vit", {"pairs": PAIRS["vit"]}) for m in ("fitnet", "at", "rkd", "crd")),
    ("ofa", "vit", {"stages": ["blocks.0", "blocks.1"]}),
    ("ofa", "mlp", {"stages": ["layers.0"]}),
]


@pytest.mark.parametrize(("name", "arch", "cfg"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_feature_method_trains_through_hooks(
    tmp_path: Path, name: str, arch: str, cfg: dict[str, Any]
) -> None:
    method = make(name, arch, **cfg)
    extras = method.extras()
    before = {k: v.detach().clone() for k, v in method.student.state_dict().items()}
    extra_before = [p.detach().clone() for m in extras.values() for p in m.parameters()]
    run(method, tmp_path)
    after = method.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the student did not train"
    extra_after = [p for m in extras.values() for p in m.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(extra_before, extra_after, strict=True)), (
        "a projector did not train"
    )
    method.export(tmp_path / "student")
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "student" / "model.safetensors"))) == set(
        before
    )  # projectors stay out


def test_hooks_do_not_change_outputs() -> None:
    """The taps only read: the student's logits are the same with and without them."""
    plain = build_model("vit", IN_SHAPE, 10, STUDENTS["vit"]).eval()
    x, _ = data(8)
    expected = plain(x)
    tapped = make("fitnet", "vit", pairs=PAIRS["vit"])
    tapped.student.load_state_dict(plain.state_dict())
    assert torch.equal(tapped.student.eval()(x), expected)


def test_resume_is_exact_with_augmentation_and_best_snapshots(tmp_path: Path) -> None:
    """Mixup + crop drawn in `prepare`, best-on-validation snapshots in `after_step`: a run killed after
    its step-4 checkpoint and resumed ends with the uninterrupted run's weights, bit for bit."""

    def method() -> ClassifierMethod:
        m = make("kd", "mlp")
        m.ctx.augment = Augment(crop_padding=1, mixup_alpha=0.4)
        m.ctx.validation, m.ctx.eval_every = data(32), 2
        return m

    whole = method()
    run(whole, tmp_path / "a", steps=8, checkpoint_every=4)
    killed = tmp_path / "b"
    shutil.copytree(tmp_path / "a", killed)
    for ckpt in (killed / "checkpoints").iterdir():
        if not ckpt.name.endswith("4"):
            shutil.rmtree(ckpt)
    resumed = method()
    x, y = data()
    cfg = TrainConfig(steps=8, lr=0.01, max_grad_norm=None, checkpoint_every=4)
    result = train(
        method=resumed,
        stream=TensorStream(x, y, torch.arange(len(y)), 16, 0),
        cfg=cfg,
        out_dir=killed,
        seed=0,
        resume=True,
    )
    assert result.resumed_from == 4
    for k, v in whole.student.state_dict().items():
        assert torch.equal(v, resumed.student.state_dict()[k]), k
    assert whole.best["step"] == resumed.best["step"] and whole.best["accuracy"] == resumed.best["accuracy"]
