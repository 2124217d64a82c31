"""Consistency distillation: f is the identity at t = 0 and the network's x0 on the grid; with an exact
teacher on a one-point dataset the exact consistency function has zero loss, on Gaussian data Heun's
pairs are far more consistent than Euler's; the target and loss match a float64 reference written out
here; the target network is an EMA of the student, checkpointed; a short run lowers the loss."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from distill.classifier.batches import ClassifierBatch, TensorStream
from distill.configs.diffusion import ConsistencyConfig
from distill.diffusion.data import load_data
from distill.diffusion.models import Denoiser, ToyMLP
from distill.diffusion.paths import NoisePath, time_grid
from distill.engine.trainer import train
from distill.methods.base import Phase, StepContext
from distill.methods.diffusion.base import DiffusionContext, frozen_copy
from distill.methods.diffusion.consistency import Consistency, distance
from distill.recipe_base import TrainConfig
from distill.recipe_diffusion import ToyDataConfig

KINDS = ["flow", "vp", "edm"]
Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t per row) -> x0


class Analytic(nn.Module):
    """A 'network' whose x0 is a closed-form function of (x, t): it undoes the path's input scaling
    and returns the raw output `path.output_for` that decodes to that x0. Works in float64."""

    def __init__(self, path: NoisePath, fn: Fn) -> None:
        super().__init__()
        self.path, self.fn = path, fn
        self.dummy = nn.Parameter(torch.zeros(()))  # something for an optimizer to hold

    def forward(
        self, inp: torch.Tensor, time: torch.Tensor, labels: object = None, guidance: object = None
    ) -> torch.Tensor:
        t = (time / 1000.0).to(inp.dtype)
        x = inp
        if self.path.kind == "edm":
            x = inp * torch.sqrt(self.path.sigma(t) ** 2 + self.path.sigma_data**2)[:, None]
        return self.path.output_for(self.fn(x, t), x, t) + 0.0 * self.dummy


def gaussian(path: NoisePath, mean: torch.Tensor, std: float) -> tuple[Fn, Fn]:
    """For data N(mean, std^2 I): the exact denoiser E[x0 | x_t] and the exact consistency function
    (the probability-flow ODE keeps (x - alpha mean) / sqrt(alpha^2 std^2 + sigma^2) fixed)."""

    def coef(t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, s = path.alpha(t).to(like.dtype)[:, None], path.sigma(t).to(like.dtype)[:, None]
        return a, s

    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = coef(t, x)
        m = mean.to(x.dtype)
        return m + a * std**2 / (a**2 * std**2 + s**2) * (x - a * m)

    def consistency(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = coef(t, x)
        m = mean.to(x.dtype)
        return m + std * (x - a * m) / torch.sqrt(a**2 * std**2 + s**2)

    return denoiser, consistency


def analytic_context(kind: str, teacher_fn: Fn, student_fn: Fn) -> DiffusionContext:
    path = NoisePath(kind)  # type: ignore[arg-type]
    teacher: Denoiser = frozen_copy(Denoiser(Analytic(path, teacher_fn), path))  # type: ignore[assignment]
    return DiffusionContext(
        path, (2,), 0, teacher, 1.0, lambda i, g: Denoiser(Analytic(path, student_fn), path)
    )


def mlp_context(kind: str, classes: int = 0) -> DiffusionContext:
    torch.manual_seed(0)
    path = NoisePath(kind)  # type: ignore[arg-type]
    teacher: Denoiser = frozen_copy(Denoiser(ToyMLP(hidden=32, layers=1, classes=classes), path))  # type: ignore[assignment]

    def make(init: str, guidance_input: bool) -> Denoiser:
        net = ToyMLP(hidden=32, layers=1, classes=classes, guidance_embed=guidance_input)
        if init == "teacher":
            net.load_state_dict(teacher.net.state_dict(), strict=False)
        return Denoiser(net, path)

    return DiffusionContext(path, (2,), classes, teacher, 1.0, make)  # type: ignore[arg-type]


def every_n(intervals: int, repeats: int) -> torch.Tensor:
    return torch.arange(intervals).repeat(repeats)


def step_ctx(method: Consistency, n: int) -> StepContext:
    return StepContext({"student": method.student}, float(n), Phase("main"), 0, torch.device("cpu"))


@pytest.mark.parametrize("kind", KINDS)
def test_f_is_the_identity_at_zero_and_the_networks_x0_on_the_grid(kind: str) -> None:
    method = Consistency(mlp_context(kind), ConsistencyConfig(discretization=6))
    x = 3 * torch.randn(64, 2)
    zero = torch.zeros(64)
    x0 = method.student.x0(x, zero)
    assert torch.equal(method.consistency(x, zero, x0), x)
    assert torch.equal(method.consistency(x, zero, torch.full_like(x, float("nan"))), x)
    for t in time_grid(6)[:-1]:  # every grid point t >= t_1
        tt = t.expand(64)
        f = method.consistency(x, tt, method.student.x0(x, tt))
        torch.testing.assert_close(f, method.student.x0(x, tt), atol=1e-6, rtol=1e-6)
    half = torch.full((64,), 0.5 / 6)  # between 0 and t_1: the even blend
    torch.testing.assert_close(method.consistency(x, half, x0), 0.5 * x + 0.5 * x0)


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("kind", KINDS)
def test_exact_consistency_function_of_a_one_point_dataset_has_zero_loss(kind: str, solver: str) -> None:
    point = torch.tensor([0.7, -1.3], dtype=torch.float64)
    denoiser, exact = gaussian(NoisePath(kind), point, 0.0)  # type: ignore[arg-type]
    assert torch.equal(denoiser(torch.randn(3, 2, dtype=torch.float64), torch.rand(3)), point.expand(3, 2))
    cfg = ConsistencyConfig(discretization=7, solver=solver, distance="l2")  # type: ignore[arg-type]
    method = Consistency(analytic_context(kind, denoiser, exact), cfg)
    n = every_n(7, 4)
    x = point.expand(len(n), 2)
    pair = method.pair(x, torch.randn(len(n), 2, dtype=torch.float64), n, None)
    assert bool((pair["s"] < pair["t"]).all()) and float(pair["s"].min()) == 0.0
    # float32 rounding of the time feature (1000 t) is all that separates the target from the point
    torch.testing.assert_close(pair["target"], x, atol=1e-6, rtol=0)
    batch = ClassifierBatch(x, torch.zeros(len(n), dtype=torch.long), torch.arange(len(n)), extra=pair)
    loss, parts = method.loss(step_ctx(method, len(n)), batch)
    assert float(loss.detach()) < 1e-12 and parts["l2"] < 1e-12


@pytest.mark.parametrize("kind", ["flow", "vp"])
def test_heun_pairs_are_far_more_consistent_than_euler_pairs_on_gaussian_data(kind: str) -> None:
    """Teacher = the exact Gaussian denoiser, student = target = the exact consistency function: the
    loss is the solver's local error seen through f, O(h^4) for Heun against O(h^2) for Euler."""
    mean = torch.tensor([1.0, -0.5], dtype=torch.float64)
    denoiser, exact = gaussian(NoisePath(kind), mean, 0.6)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    n = every_n(20, 50)[1:]  # n = 0 has no solver error: the target is the teacher's x0, not f
    n = n[n > 0]
    x = mean + 0.6 * torch.randn(len(n), 2, generator=g, dtype=torch.float64)
    eps = torch.randn(len(n), 2, generator=g, dtype=torch.float64)
    losses = {}
    for solver in ("euler", "heun"):
        cfg = ConsistencyConfig(discretization=20, solver=solver, distance="l2")  # type: ignore[arg-type]
        method = Consistency(analytic_context(kind, denoiser, exact), cfg)
        pair = method.pair(x, eps, n, None)
        # the solver lands near the exact trajectory point, whose f equals f at the start
        torch.testing.assert_close(
            exact(pair["xs"], pair["s"]), exact(pair["xt"], pair["t"]), atol=0.05, rtol=0
        )
        batch = ClassifierBatch(x, torch.zeros(len(n), dtype=torch.long), torch.arange(len(n)), extra=pair)
        losses[solver] = float(method.loss(step_ctx(method, len(n)), batch)[0].detach())
    assert losses["heun"] < 1e-3 * losses["euler"], losses
    assert losses["euler"] > 1e-8, losses


def naive_heun(
    teacher: Denoiser, path: NoisePath, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """Heun on x = alpha x0 + sigma eps, one row at a time, float64 arithmetic on the network's outputs."""
    out = []
    for xi, ti, si in zip(x.double(), t.double(), s.double(), strict=True):

        def x0(z: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            return teacher.x0(z[None].float(), tt[None].float())[0].double()

        a_t, s_t = path.alpha(ti), path.sigma(ti)
        d0 = x0(xi, ti)
        e0 = (xi - a_t * d0) / s_t
        if float(si) == 0.0:
            out.append(d0)
            continue
        a_s, s_s = path.alpha(si), path.sigma(si)
        euler = a_s * d0 + s_s * e0
        d1 = x0(euler, si)
        e1 = (euler - a_s * d1) / s_s
        out.append(xi + 0.5 * ((a_s - a_t) * (d0 + d1) + (s_s - s_t) * (e0 + e1)))
    return torch.stack(out)


@pytest.mark.parametrize("kind", KINDS)
def test_target_and_loss_match_a_float64_reference(kind: str) -> None:
    ctx = mlp_context(kind)
    cfg = ConsistencyConfig(discretization=5, solver="heun", distance="pseudo_huber", init="scratch")
    method = Consistency(ctx, cfg)
    with torch.no_grad():  # a target network that differs from the student
        for p in method.target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.manual_seed(5)
    x, y = torch.randn(40, 2), torch.zeros(40, dtype=torch.long)
    batch = method.prepare(ClassifierBatch(x, y, torch.arange(40)), Phase("main"))
    e, path = batch.extra, ctx.path
    grid = time_grid(5).double()
    assert set(e["t"].double().tolist()) <= set(grid[:-1].tolist())
    torch.testing.assert_close(e["s"].double(), e["t"].double() - 0.2, atol=1e-6, rtol=0)  # one interval
    assert ctx.teacher is not None
    xs = naive_heun(ctx.teacher, path, e["xt"], e["t"], e["s"])
    torch.testing.assert_close(e["xs"].double(), xs, atol=1e-4, rtol=1e-4)
    tgt = method.target.x0(e["xs"], e["s"]).double()
    at_zero = (e["s"] == 0)[:, None]
    c = (1 - 5 * e["s"].double()).clamp(0, 1)[:, None]
    expected = torch.where(at_zero, e["xs"].double(), c * e["xs"].double() + (1 - c) * tgt)
    torch.testing.assert_close(e["target"].double(), expected, atol=1e-5, rtol=1e-5)
    loss, parts = method.loss(step_ctx(method, 40), batch)
    f = method.student.x0(e["xt"], e["t"]).double()  # t >= t_1: f is the student's x0
    d = ((f - e["target"].double()) ** 2).sum(1)
    cc = 0.00054 * math.sqrt(2)
    ref = (torch.sqrt(d + cc**2) - cc).mean().detach()
    torch.testing.assert_close(loss.detach().double(), ref, atol=1e-6, rtol=1e-5)
    assert parts["pseudo_huber"] == pytest.approx(float(ref), rel=1e-5)


def test_distances() -> None:
    a, b = torch.zeros(3, 4), torch.tensor([[0.0, 0, 0, 0], [3, 4, 0, 0], [1, 1, 1, 1]])
    c = 0.00054 * 2
    torch.testing.assert_close(
        distance(a, b, "pseudo_huber"), torch.tensor([0.0, math.hypot(5, c) - c, math.hypot(2, c) - c])
    )
    torch.testing.assert_close(distance(a, b, "l2"), torch.tensor([0.0, 25 / 4, 1.0]))


def test_target_is_an_ema_of_the_student_and_is_checkpointed(tmp_path: Path) -> None:
    method = Consistency(mlp_context("flow"), ConsistencyConfig(discretization=4, target_ema=0.9))
    assert "target" in method.frozen_modules()
    before = [p.detach().clone() for p in method.target.parameters()]
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    method.after_step(Phase("main"), 0)
    for old, new, live in zip(before, method.target.parameters(), method.student.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * live)
    assert method.ema is not None  # the evaluated EMA (0.999) is a different model
    assert not torch.allclose(next(method.ema.parameters()), next(method.target.parameters()))
    state = method.state_dict()
    assert {"target", "ema"} <= set(state)
    torch.save(state, tmp_path / "s.pt")
    fresh = Consistency(mlp_context("flow"), ConsistencyConfig(discretization=4, target_ema=0.9))
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for a, b in zip(fresh.target.state_dict().values(), method.target.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # evaluation samples with the EMA model's f, not the target's and not the raw x0 below t_1
    x, t = torch.randn(8, 2), torch.full((8,), 0.1 / 4)
    got = fresh.x0_fn()(x, t, None)
    assert fresh.ema is not None
    torch.testing.assert_close(got, 0.9 * x + 0.1 * fresh.ema.x0(x, t))
    assert fresh.sampler == "consistency" and fresh.sample_steps == 1


def fixed_loss(method: Consistency, x: torch.Tensor, eps: torch.Tensor, n: torch.Tensor) -> float:
    with torch.no_grad():
        pair = method.pair(x, eps, n, None)
        f = method.consistency(pair["xt"], pair["t"], method.student.x0(pair["xt"], pair["t"]))
        return float(distance(f, pair["target"], "l2").mean())


def test_a_short_run_lowers_the_loss_on_the_ring(tmp_path: Path) -> None:
    data = load_data(ToyDataConfig(train_size=512, test_size=64), 0)
    method = Consistency(
        mlp_context("flow"), ConsistencyConfig(discretization=8, target_ema=0.9, init="scratch")
    )
    g = torch.Generator().manual_seed(3)
    x = data.x[:256]
    eps, n = torch.randn(x.shape, generator=g), torch.randint(0, 8, (256,), generator=g)
    before = fixed_loss(method, x, eps, n)
    stream = TensorStream(data.x, data.y, torch.arange(len(data.x)), 128, 0)
    cfg = TrainConfig(steps=60, lr=3e-3, threads=1, warmup_steps=0)
    result = train(method=method, stream=stream, cfg=cfg, out_dir=tmp_path, seed=0)
    assert all(math.isfinite(h["pseudo_huber"]) for h in result.history)
    after = fixed_loss(method, x, eps, n)
    assert after < 0.3 * before, (before, after)


def test_distillation_learns_the_exact_consistency_function_of_gaussian_data(tmp_path: Path) -> None:
    """Exact Gaussian teacher, MLP student from scratch: after a short run its one-step output from
    pure noise is close to where the teacher's ODE ends (closed form), which no denoiser is."""
    mean = torch.tensor([1.0, -0.5])
    path = NoisePath("flow")
    denoiser, exact = gaussian(path, mean, 0.6)
    ctx = analytic_context("flow", denoiser, exact)
    torch.manual_seed(0)
    ctx.make_student = lambda init, g: Denoiser(ToyMLP(hidden=32, layers=1), path)
    cfg = ConsistencyConfig(discretization=8, target_ema=0.9, init="scratch", ema=None)
    method = Consistency(ctx, cfg)
    z, one = torch.randn(512, 2, generator=torch.Generator().manual_seed(1)), torch.ones(512)

    def error() -> float:
        with torch.no_grad():
            return float((method.x0_fn()(z, one, None) - exact(z, one)).pow(2).sum(1).mean())

    before = error()
    x = mean + 0.6 * torch.randn(2048, 2)
    stream = TensorStream(x, torch.zeros(2048, dtype=torch.long), torch.arange(2048), 128, 0)
    train(
        method=method, stream=stream, cfg=TrainConfig(steps=100, lr=3e-3, threads=1), out_dir=tmp_path, seed=0
    )
    after = error()
    denoised = float((denoiser(z, one) - exact(z, one)).pow(2).sum(1).mean())  # the teacher's x0 at t = 1
    assert after < 0.05 * before and after < 0.1 * denoised, (before, after, denoised)
