"""DMD2, VSD and SiD: groups and phases; each phase steps only its own networks; the generator's gradient
on its sample is the method's update direction (SiD's also through both score networks); no update at
all while the fake score equals the teacher; the inputs of a multi-step generator; all three pull a
one-step generator onto a Gaussian whose exact posterior mean is the teacher; exact resume of DMD2 with
its regression pool and GAN head."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from distill.classifier.batches import ClassifierBatch, TensorStream
from distill.configs.diffusion import DMD2Config, SiDConfig, VSDConfig
from distill.diffusion.models import Denoiser, ToyMLP
from distill.diffusion.paths import NoisePath, time_grid
from distill.diffusion.sampling import sample_chain
from distill.engine.trainer import train
from distill.errors import CompatibilityError
from distill.methods.base import Phase, StepContext
from distill.methods.diffusion.base import DiffusionContext, frozen_copy
from distill.methods.diffusion.dmd2 import DMD2, POOL_SIZE, POOL_STEPS
from distill.methods.diffusion.score_distill import VSD, ScoreDistill, SiD
from distill.recipe_base import TrainConfig


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Tiny tensors: extra intra-op threads only add OpenMP wake-ups on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def context(kind: str = "flow", classes: int = 0, teacher: Denoiser | None = None) -> DiffusionContext:
    torch.manual_seed(0)
    path = NoisePath(kind)  # type: ignore[arg-type]
    teacher = teacher or frozen_copy(Denoiser(ToyMLP(hidden=32, layers=1, classes=classes), path))  # type: ignore[assignment]

    def make(init: str, guidance_input: bool) -> Denoiser:
        net = ToyMLP(hidden=32, layers=1, classes=classes, guidance_embed=guidance_input)
        if init == "teacher" and isinstance(teacher.net, ToyMLP):  # type: ignore[union-attr]
            net.load_state_dict(teacher.net.state_dict(), strict=False)  # type: ignore[union-attr]
        return Denoiser(net, path)

    return DiffusionContext(path, (2,), classes, teacher, 1.0, make)  # type: ignore[arg-type]


def build(name: str, ctx: DiffusionContext, **cfg: object) -> ScoreDistill:
    if name == "dmd2":
        return DMD2(ctx, DMD2Config(**cfg))  # type: ignore[arg-type]
    if name == "vsd":
        return VSD(ctx, VSDConfig(**cfg))  # type: ignore[arg-type]
    return SiD(ctx, SiDConfig(**cfg))  # type: ignore[arg-type]


def batch(n: int = 32, classes: int = 0, seed: int = 1) -> ClassifierBatch:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, max(classes, 1), (n,), generator=g)
    return ClassifierBatch(torch.randn(n, 2, generator=g), y, torch.arange(n))


def stream(x: torch.Tensor, batch_size: int = 32) -> TensorStream:
    return TensorStream(x, torch.zeros(len(x), dtype=torch.long), torch.arange(len(x)), batch_size, 0)


def step_ctx(method: ScoreDistill, group: str) -> StepContext:
    return StepContext(method.modules(), 1.0, Phase(group), 0, torch.device("cpu"))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def perturb(module: nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ----------------------------------------------------------------------------------------------------
# Structure and phases
# ----------------------------------------------------------------------------------------------------


def test_groups_put_the_generator_first_and_phases_are_two_timescale() -> None:
    ctx = context()
    dmd = build("dmd2", ctx)
    assert dmd.groups() == {"generator": ["student"], "critic": ["fake"]}
    assert dmd.phases() == [Phase("critic", 5), Phase("generator", 1)]
    assert dmd.student_group() == "generator" and dmd.sampler == "consistency"
    gan = build("dmd2", ctx, gan_weight=0.1, critic_updates=2)
    assert set(gan.modules()) == {"student", "fake", "head"} and gan.groups()["critic"] == ["fake", "head"]
    assert gan.phases() == [Phase("critic", 2), Phase("generator", 1)]
    for name in ("vsd", "sid"):
        m = build(name, ctx, critic_updates=3)
        assert list(m.groups()) == ["generator", "critic"] and set(m.modules()) == {"student", "fake"}
        assert m.phases() == [Phase("critic", 3), Phase("generator", 1)]
    assert ctx.teacher is not None
    assert torch.equal(dmd.fake.net.inp.weight, ctx.teacher.net.inp.weight)  # fake starts as the teacher
    assert dmd.fake is not dmd.student
    dmd.check_distributed("MULTI_GPU", None)
    dmd.check_distributed("DEEPSPEED", 2)
    for kind, stage in (("FSDP", None), ("DEEPSPEED", 3)):
        with pytest.raises(CompatibilityError, match="ZeRO-1/2"):
            dmd.check_distributed(kind, stage)


@pytest.mark.parametrize("name", ["dmd2", "vsd", "sid"])
def test_each_phase_steps_only_its_own_networks(name: str, tmp_path: Path) -> None:
    extra = {"regression": 1.0, "gan_weight": 0.5} if name == "dmd2" else {}
    data = torch.randn(64, 2)
    for group in ("critic", "generator"):
        ctx = context()
        method = build(name, ctx, **extra)
        perturb(method.fake, seed=3)  # a fake unlike the teacher: the generator gets a non-zero update
        method.phases = lambda g=group: [Phase(g, 1)]  # type: ignore[method-assign]
        before = {n: snapshot(m) for n, m in method.modules().items()}
        assert ctx.teacher is not None
        teacher = snapshot(ctx.teacher)
        cfg = TrainConfig(steps=2, lr=1e-2, schedule="constant")
        train(method=method, stream=stream(data), cfg=cfg, out_dir=tmp_path / group, seed=0)
        stepped = method.groups()[group]
        for n, m in method.modules().items():
            assert same(m, before[n]) != (n in stepped), (group, n)
        assert same(ctx.teacher, teacher)


# ----------------------------------------------------------------------------------------------------
# Generator gradients
# ----------------------------------------------------------------------------------------------------


def _generator_grad(method: ScoreDistill, b: ClassifierBatch, x_g: torch.Tensor) -> torch.Tensor:
    leaf = x_g.detach().clone().requires_grad_(True)
    per_row, _ = method.generator_loss(step_ctx(method, "generator"), b, leaf)
    per_row.sum().backward()
    assert leaf.grad is not None
    return leaf.grad


@pytest.mark.parametrize("kind", ["flow", "vp", "edm"])
def test_dmd_and_vsd_gradients_on_the_sample_are_their_update_directions(kind: str) -> None:
    ctx = context(kind)
    assert ctx.teacher is not None
    for name in ("dmd2", "vsd"):
        method = build(name, ctx)
        perturb(method.fake, seed=5)
        b = method.prepare(batch(), Phase("generator"))
        e, x_g = b.extra, torch.randn(32, 2)
        t, path = e["t"], ctx.path
        xt = path.noisy(x_g, e["eps"], t)
        with torch.no_grad():
            real, fake = ctx.teacher.x0(xt, t), method.fake.x0(xt, t)
        if name == "dmd2":
            want = (fake - real) / (x_g - real).abs().sum(1, keepdim=True)
        else:
            a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
            eps_r, eps_f = (xt - a * real) / s, (xt - a * fake) / s
            want = s**2 / (a**2 + s**2) * (eps_r - eps_f) / 2
        got = _generator_grad(method, b, x_g)
        assert float(want.abs().max()) > 1e-4
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_sid_gradient_flows_through_both_score_networks() -> None:
    """The method's gradient on x_g equals autograd through a naive rewrite of the loss with both
    networks in the graph, and differs from the explicit-term-only gradient (fake - real) / (D s)."""
    ctx = context()
    assert ctx.teacher is not None
    method = build("sid", ctx, alpha=1.2)
    perturb(method.fake, seed=7, scale=0.2)
    e = method.prepare(batch(16), Phase("generator")).extra
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    t = e["t"][:, None]
    xt = (1 - t) * x + t * e["eps"]
    real, fake = ctx.teacher.x0(xt, e["t"]), method.fake.x0(xt, e["t"])
    scale = (x - real).abs().mean(1).detach()
    naive = ((1 - 1.2) * ((real - fake) ** 2).mean(1) + ((real - fake) * (fake - x)).mean(1)) / scale
    (want,) = torch.autograd.grad(naive.sum(), x)
    got = _generator_grad(
        method, ClassifierBatch(torch.zeros(16, 2), torch.zeros(16), torch.arange(16), extra=e), x
    )
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    explicit_only = (fake - real).detach() / (2 * scale[:, None])
    assert float((got - explicit_only).abs().max()) > 1e-3


@pytest.mark.parametrize("name", ["dmd2", "vsd", "sid"])
def test_no_generator_update_while_the_fake_score_is_the_teacher(name: str) -> None:
    """At initialisation the fake network is a copy of the teacher: every generator loss is 0 with
    zero gradient (SiD's terms through the two networks cancel)."""
    ctx = context()
    method = build(name, ctx)
    b = method.prepare(batch(), Phase("generator"))
    leaf = torch.randn(32, 2).requires_grad_(True)
    per_row, _ = method.generator_loss(step_ctx(method, "generator"), b, leaf)
    per_row.sum().backward()
    assert leaf.grad is not None
    assert float(per_row.detach().abs().max()) < 1e-6 and float(leaf.grad.abs().max()) < 1e-6


def test_critic_regresses_the_generators_detached_sample() -> None:
    ctx = context("vp")
    method = build("sid", ctx, t_min=0.1, t_max=0.6)
    e = method.prepare(batch(), Phase("critic")).extra
    assert bool((e["t_in"] == 1).all()) and not e["x_g"].requires_grad
    torch.testing.assert_close(e["x_g"], method.student.x0(e["x_in"], e["t_in"]))
    torch.testing.assert_close(e["xt"], ctx.path.noisy(e["x_g"], e["eps"], e["t"]))
    torch.testing.assert_close(ctx.path.x0(e["target"], e["xt"], e["t"]), e["x_g"], atol=1e-5, rtol=1e-5)
    assert float(e["t"].min()) >= 0.1 and float(e["t"].max()) <= 0.6


@pytest.mark.parametrize("backward_simulation", [True, False])
def test_multi_step_inputs_are_the_generators_chain_or_noised_data(backward_simulation: bool) -> None:
    """A generator whose x0 is the constant c: at grid level t_i its backward-simulated input is
    alpha(t_i) c + sigma(t_i) eps; without simulation it is the batch (all d) noised to t_i."""
    ctx = context("flow")
    method = build("dmd2", ctx, steps=3, backward_simulation=backward_simulation)
    c, d = torch.tensor([2.0, -1.0]), torch.tensor([-3.0, 0.5])
    method.student.x0 = lambda x, t, labels=None, g=None: c.expand_as(x)  # type: ignore[method-assign]
    n = 6000
    b = ClassifierBatch(d.expand(n, 2).clone(), torch.zeros(n, dtype=torch.long), torch.arange(n))
    torch.manual_seed(4)
    x_in, t_in = method.generator_inputs(b, None)
    grid = time_grid(3)
    assert set(t_in.tolist()) == set(grid[:3].tolist())
    for i in range(3):
        rows = t_in == grid[i]
        mean = (c if backward_simulation else d) * (1 - grid[i])
        torch.testing.assert_close(x_in[rows].mean(0), mean, atol=0.08, rtol=0)
        torch.testing.assert_close(x_in[rows].std(0), grid[i].expand(2), atol=0.05, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

MU, S = torch.tensor([1.5, -1.0]), 0.3


class GaussianPosterior(nn.Module):
    """The exact teacher for data N(MU, S^2 I) on the flow path: E[x0 | x_t] = MU + a S^2 / (a^2 S^2 +
    t^2) (x_t - a MU), a = 1 - t, returned as the velocity (x_t - x0) / t that Denoiser decodes."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mu", MU.clone())

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, *_: object) -> torch.Tensor:
        t = (timestep / 1000)[:, None]
        a = 1 - t
        x0 = self.mu + a * S**2 / (a**2 * S**2 + t**2) * (x - a * self.mu)
        return (x - x0) / t.clamp_min(1e-6)


@pytest.mark.parametrize("name", ["dmd2", "vsd", "sid"])
def test_one_step_generator_lands_on_the_teachers_gaussian(name: str, tmp_path: Path) -> None:
    path = NoisePath("flow")
    ctx = context(teacher=frozen_copy(Denoiser(GaussianPosterior(), path)))  # type: ignore[arg-type]
    method = build(name, ctx, critic_updates=3)  # student and fake: fresh ToyMLPs (nothing to copy)
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))

    def moments() -> tuple[float, float]:
        with torch.no_grad():
            x = method.student.x0(z, torch.ones(2000))
        return float((x.mean(0) - MU).norm()), float(x.std(0).mean())

    err0, std0 = moments()
    assert err0 > 1.0 and std0 > 1.0
    data = MU + S * torch.randn(1024, 2, generator=torch.Generator().manual_seed(6))
    cfg = TrainConfig(steps=60, lr=3e-3, schedule="constant")
    train(method=method, stream=stream(data, 64), cfg=cfg, out_dir=tmp_path, seed=0)
    err, std = moments()
    assert err < 0.25 and abs(std - S) < 0.15, (err, std)


def _dmd2_run(out: Path, steps: int, resume: bool) -> tuple[DMD2, dict[str, torch.Tensor]]:
    ctx = context(classes=3)
    method = DMD2(ctx, DMD2Config(steps=2, critic_updates=2, regression=0.5, gan_weight=0.1, ema=0.9))
    data = torch.randn(96, 2, generator=torch.Generator().manual_seed(8))
    labels = torch.arange(96) % 3
    s = TensorStream(data, labels, torch.arange(96), 16, 0)
    cfg = TrainConfig(steps=steps, lr=1e-2, checkpoint_every=2, warmup_steps=1)
    train(method=method, stream=s, cfg=cfg, out_dir=out, seed=0, resume=resume)
    weights = {f"{m}.{k}": v.detach().clone() for m, mod in method.modules().items()
               for k, v in mod.state_dict().items()}  # fmt: skip
    assert method.ema is not None
    weights.update({f"ema.{k}": v.detach().clone() for k, v in method.ema.state_dict().items()})
    return method, weights


def test_dmd2_resume_is_bit_identical(tmp_path: Path) -> None:
    _, straight = _dmd2_run(tmp_path / "straight", 4, resume=False)
    _dmd2_run(tmp_path / "split", 4, resume=False)  # leaves its step-2 checkpoint
    ckpt = tmp_path / "split" / "checkpoints" / "step-00000002" / "trainer_state.pt"
    state = torch.load(ckpt, weights_only=True)["method"]
    assert state["regression"]["noise"].shape == (POOL_SIZE, 2) and "ema" in state
    method, resumed = _dmd2_run(tmp_path / "split", 4, resume=True)
    assert resumed.keys() == straight.keys() and any(k.startswith("head.") for k in resumed)
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    # the pool pairs each noise with the teacher's 16-step Euler sample from it
    pool = method.regression_pool(torch.device("cpu"))
    assert method.ctx.teacher is not None
    teacher, lab = method.ctx.teacher, pool["labels"]
    want = sample_chain(lambda x, t: teacher.x0(x, t, lab), method.path, pool["noise"], POOL_STEPS, "ode")
    torch.testing.assert_close(pool["target"], want)
