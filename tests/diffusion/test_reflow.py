"""Reflow: the coupling is the teacher's ODE from the batch's noise (checked against a naive float64
Euler loop), the target is the path's interpolant between the coupled pair (for flow: noise minus
sample, a straight line), and training lowers the loss on a fixed batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.classifier.batches import ClassifierBatch, TensorStream
from distill.configs.diffusion import ReflowConfig
from distill.diffusion.models import Denoiser, ToyMLP
from distill.diffusion.paths import NoisePath, time_grid
from distill.diffusion.sampling import sample_chain
from distill.engine.trainer import train
from distill.methods.base import Phase
from distill.methods.diffusion.base import DiffusionContext
from distill.methods.diffusion.reflow import Reflow, prior_scale
from distill.recipe_base import TrainConfig

KINDS = ["flow", "vp", "edm"]


def context(kind: str, classes: int = 0, guidance: float = 1.0) -> DiffusionContext:
    torch.manual_seed(0)
    path = NoisePath(kind)  # type: ignore[arg-type]
    teacher = Denoiser(ToyMLP(hidden=32, layers=1, classes=classes), path).eval()
    teacher.requires_grad_(False)

    def make(init: str, guidance_input: bool) -> Denoiser:
        net = ToyMLP(hidden=32, layers=1, classes=classes, guidance_embed=guidance_input)
        if init == "teacher":
            net.load_state_dict(teacher.net.state_dict(), strict=False)
        return Denoiser(net, path)

    return DiffusionContext(path, (2,), classes, teacher, guidance, make)  # type: ignore[arg-type]


def batch(n: int = 64, classes: int = 0, seed: int = 1) -> ClassifierBatch:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, max(classes, 1), (n,), generator=g)
    return ClassifierBatch(torch.randn(n, 2, generator=g), y, torch.arange(n))


def test_flow_target_is_the_straight_line_to_the_teachers_euler_sample() -> None:
    ctx = context("flow")
    method = Reflow(ctx, ReflowConfig(teacher_steps=5))
    e = method.prepare(batch(), Phase("main")).extra
    # The teacher's Euler chain written out, its arithmetic in float64: x <- x + (s - t) v(x, t).
    assert ctx.teacher is not None
    teacher = ctx.teacher
    x, grid = e["eps"].double(), time_grid(5).double()
    for i in range(5):
        t = grid[i].expand(len(x))
        x = x + (grid[i + 1] - grid[i]) * teacher(x.float(), t.float()).double()
    torch.testing.assert_close(e["sample"].double(), x, atol=1e-5, rtol=1e-5)
    t = e["t"][:, None]
    torch.testing.assert_close(e["xt"], (1 - t) * e["sample"] + t * e["eps"])
    # The target velocity is noise minus sample; float32 rounding of x_t grows as 1 / t.
    err = (e["target"].double() - (e["eps"].double() - x)).abs()
    assert bool((err <= 1e-5 + 2e-6 / t.double()).all()), err.max()


@pytest.mark.parametrize("kind", KINDS)
def test_target_decodes_to_the_coupled_pair(kind: str) -> None:
    ctx = context(kind)
    method = Reflow(ctx, ReflowConfig(teacher_steps=4))
    torch.manual_seed(3)
    e = method.prepare(batch(), Phase("main")).extra
    path = ctx.path
    z = e["eps"] * prior_scale(path)
    assert ctx.teacher is not None
    teacher = ctx.teacher
    torch.testing.assert_close(e["sample"], sample_chain(teacher.x0, path, z, 4, "ode"))
    torch.testing.assert_close(e["xt"], path.noisy(e["sample"], e["eps"], e["t"]))
    ok = e["t"] > 1e-2  # the inversions divide by sigma(t)
    torch.testing.assert_close(
        path.x0(e["target"], e["xt"], e["t"])[ok], e["sample"][ok], atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(path.eps(e["sample"], e["xt"], e["t"])[ok], e["eps"][ok], atol=1e-3, rtol=1e-3)
    assert float(e["t"].min()) > 0 and float(e["t"].max()) <= 1


def test_coupling_is_deterministic_given_the_noise() -> None:
    method = Reflow(context("vp"), ReflowConfig(teacher_steps=6))
    z = torch.randn(32, 2)
    torch.manual_seed(0)
    first = method.couple(z, None)
    torch.manual_seed(123)
    torch.randn(100)
    torch.testing.assert_close(method.couple(z, None), first, rtol=0, atol=0)
    assert not torch.allclose(method.couple(z + 0.5, None), first)


def test_conditional_coupling_uses_the_batch_labels_with_guidance() -> None:
    ctx = context("flow", classes=3, guidance=2.5)
    method = Reflow(ctx, ReflowConfig(teacher_steps=3))
    b = batch(classes=3)
    e = method.prepare(b, Phase("main")).extra
    assert ctx.teacher is not None
    teacher, y = ctx.teacher, b.y

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = teacher.x0(x, t, y), teacher.x0(x, t, None)
        return uncond + 2.5 * (cond - uncond)

    torch.testing.assert_close(e["sample"], sample_chain(guided, ctx.path, e["eps"], 3, "ode"))
    other = method.couple(e["eps"], (y + 1) % 3)
    assert (other - e["sample"]).abs().max() > 1e-3


def _loss(method: Reflow, prepared: ClassifierBatch) -> float:
    e = prepared.extra
    with torch.no_grad():
        out = method.student(e["xt"], e["t"], method.labels(prepared))
    return float((out - e["target"]).pow(2).mean())


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path: Path) -> None:
    ctx = context("flow")
    method = Reflow(ctx, ReflowConfig(teacher_steps=4, init="scratch"))
    assert method.sampler == "ode" and method.sample_steps == 1
    torch.manual_seed(7)
    fixed = method.prepare(batch(256, seed=9), Phase("main"))
    before = _loss(method, fixed)
    data = torch.randn(256, 2)
    stream = TensorStream(data, torch.zeros(256, dtype=torch.long), torch.arange(256), 64, 0)
    cfg = TrainConfig(steps=60, lr=1e-2, threads=1, warmup_steps=0)
    result = train(method=method, stream=stream, cfg=cfg, out_dir=tmp_path, seed=0)
    assert all(torch.isfinite(torch.tensor(h["mse"])) for h in result.history)
    after = _loss(method, fixed)
    assert after < 0.5 * before, (before, after)
