"""Guidance distillation: the student starts as the teacher at every scale (zero-initialised guidance
embedding), its target is the teacher's guided x0 with one scale per row (checked row by row against
uncond + w (cond - uncond) in float64), the engine trains it on per-row scales, and training lowers the
loss on a fixed batch. Unconditional data is refused."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import torch

from distill.classifier.batches import ClassifierBatch, TensorStream
from distill.configs.diffusion import GuidanceDistillConfig
from distill.diffusion.models import Denoiser, ToyMLP
from distill.diffusion.paths import NoisePath
from distill.engine.trainer import train
from distill.errors import CompatibilityError, RecipeError
from distill.methods.base import Phase
from distill.methods.diffusion.base import DiffusionContext
from distill.methods.diffusion.guidance import GuidanceDistill
from distill.recipe import parse_recipe
from distill.recipe_base import TrainConfig

KINDS = ["flow", "vp", "edm"]
CLASSES = 3


def context(kind: str = "flow", classes: int = CLASSES) -> DiffusionContext:
    torch.manual_seed(0)
    path = NoisePath(kind)  # type: ignore[arg-type]
    teacher = Denoiser(ToyMLP(hidden=32, layers=1, classes=classes), path).eval()
    teacher.requires_grad_(False)

    def make(init: str, guidance_input: bool) -> Denoiser:
        net = ToyMLP(hidden=32, layers=1, classes=classes, guidance_embed=guidance_input)
        if init == "teacher":
            missing, unexpected = net.load_state_dict(teacher.net.state_dict(), strict=False)
            assert not unexpected and all(k.startswith("cond.guidance") for k in missing)
        return Denoiser(net, path)

    return DiffusionContext(path, (2,), classes, teacher, 1.0, make)  # type: ignore[arg-type]


def student_net(method: GuidanceDistill) -> ToyMLP:
    return cast(ToyMLP, method.student.net)


def batch(n: int = 64, seed: int = 1) -> ClassifierBatch:
    g = torch.Generator().manual_seed(seed)
    return ClassifierBatch(
        torch.randn(n, 2, generator=g), torch.randint(0, CLASSES, (n,), generator=g), torch.arange(n)
    )


def test_student_starts_as_the_teacher_at_every_scale() -> None:
    ctx = context()
    method = GuidanceDistill(ctx, GuidanceDistillConfig())
    assert method.guidance_input() and student_net(method).config["guidance_embed"]
    assert ctx.teacher is not None
    x, t, y = torch.randn(16, 2), torch.rand(16), torch.randint(0, CLASSES, (16,))
    cond = ctx.teacher.x0(x, t, y)
    for w in (1.0, 3.7):
        torch.testing.assert_close(method.student.x0(x, t, y, torch.full((16,), w)), cond, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_target_is_the_per_row_guided_teacher(kind: str) -> None:
    ctx = context(kind)
    method = GuidanceDistill(ctx, GuidanceDistillConfig(scale_range=(1.0, 5.0)))
    b = batch()
    e = method.prepare(b, Phase("main")).extra
    w, t, xt = e["w"], e["t"], e["xt"]
    assert float(w.min()) >= 1.0 and float(w.max()) <= 5.0 and float(w.std()) > 0.5
    assert float(t.min()) > 0 and float(t.max()) <= 1
    assert ctx.teacher is not None
    teacher = ctx.teacher
    rows = []
    for i in range(len(xt)):  # one row at a time, the mix in float64
        sl = slice(i, i + 1)
        cond = teacher.x0(xt[sl], t[sl], b.y[sl]).double()
        uncond = teacher.x0(xt[sl], t[sl], None).double()
        rows.append(uncond + w[i].double() * (cond - uncond))
    ref = torch.cat(rows)
    torch.testing.assert_close(e["target_x0"].double(), ref, atol=1e-5, rtol=1e-5)
    ok = t > 1e-2
    torch.testing.assert_close(ctx.path.x0(e["target"], xt, t)[ok].double(), ref[ok], atol=1e-4, rtol=1e-4)
    assert (ref - teacher.x0(xt, t, b.y).double()).abs().max() > 1e-3  # guidance changed the target


def test_one_engine_step_with_per_row_scales(tmp_path: Path) -> None:
    method = GuidanceDistill(context(), GuidanceDistillConfig())
    embedding = student_net(method).cond.guidance
    assert embedding is not None
    last = cast(torch.nn.Linear, embedding[2])
    assert float(last.weight.detach().abs().max()) == 0
    stream = TensorStream(torch.randn(64, 2), torch.randint(0, CLASSES, (64,)), torch.arange(64), 32, 0)
    result = train(method=method, stream=stream, cfg=TrainConfig(steps=1, lr=1e-2, threads=1, warmup_steps=0),
                   out_dir=tmp_path, seed=0)  # fmt: skip
    assert len(result.history) == 1 and result.history[0]["mse"] > 0
    assert float(last.weight.detach().abs().max()) > 0  # the gradient reached the guidance embedding
    x, t, y = torch.randn(8, 2), torch.rand(8), torch.randint(0, CLASSES, (8,))
    with torch.no_grad():
        at1 = method.student.x0(x, t, y, torch.ones(8))
        at4 = method.student.x0(x, t, y, torch.full((8,), 4.0))
    assert (at1 - at4).abs().max() > 0


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path: Path) -> None:
    method = GuidanceDistill(context(), GuidanceDistillConfig(scale_range=(1.0, 4.0)))
    torch.manual_seed(5)
    fixed = method.prepare(batch(256, seed=4), Phase("main")).extra

    def loss() -> float:
        with torch.no_grad():
            out = method.student(fixed["xt"], fixed["t"], batch(256, seed=4).y, fixed["w"])
        return float((out - fixed["target"]).pow(2).mean())

    before = loss()
    stream = TensorStream(torch.randn(256, 2), torch.randint(0, CLASSES, (256,)), torch.arange(256), 64, 0)
    cfg = TrainConfig(steps=60, lr=1e-2, threads=1, warmup_steps=0)
    train(method=method, stream=stream, cfg=cfg, out_dir=tmp_path, seed=0)
    after = loss()
    assert after < 0.5 * before, (before, after)


def test_unconditional_data_is_refused() -> None:
    with pytest.raises(CompatibilityError, match="class-conditional"):
        GuidanceDistill(context(classes=0), GuidanceDistillConfig())
    recipe = {"data": {"kind": "toy"}, "method": {"name": "cfg_distill"}}
    with pytest.raises(RecipeError, match="cfg_distill"):
        parse_recipe(recipe)
