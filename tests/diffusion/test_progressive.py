"""Progressive distillation: the target x0 makes one DDIM step land where two steps of the previous
model land (float64, every path, the s = 0 step included), from the guided teacher in round 0 and from
the frozen previous-round model after; rounds switch on schedule with the previous model a snapshot of
the student; resume is exact; a short run lowers the loss."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from distill.classifier.batches import ClassifierBatch, TensorStream
from distill.configs.diffusion import ProgressiveConfig
from distill.diffusion.models import Denoiser, ToyMLP
from distill.diffusion.paths import NoisePath, time_grid
from distill.engine.trainer import train
from distill.methods.base import Phase
from distill.methods.diffusion.base import DiffusionContext, frozen_copy
from distill.methods.diffusion.progressive import Progressive
from distill.recipe_base import TrainConfig
from tests.diffusion.test_consistency import Analytic, Fn, gaussian, mlp_context

KINDS = ["flow", "vp", "edm"]


def two_ddim_steps(fn: Fn, path: NoisePath, x: torch.Tensor, ts: list[torch.Tensor]) -> torch.Tensor:
    """x_t -> x_mid -> x_s written out: x <- alpha_s x0 + sigma_s (x - alpha_t x0) / sigma_t, x0 at s = 0."""
    for t, s in zip(ts[:-1], ts[1:], strict=True):
        x0 = fn(x, t)
        a_t, a_s = path.alpha(t)[:, None].double(), path.alpha(s)[:, None].double()
        s_t, s_s = path.sigma(t)[:, None].double(), path.sigma(s)[:, None].double()
        x = torch.where((s == 0)[:, None], x0, a_s * x0 + s_s * (x - a_t * x0) / s_t)
    return x


def one_ddim_step(
    path: NoisePath, x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    a_t, a_s = path.alpha(t)[:, None].double(), path.alpha(s)[:, None].double()
    s_t, s_s = path.sigma(t)[:, None].double(), path.sigma(s)[:, None].double()
    return torch.where((s == 0)[:, None], x0, a_s * x0 + s_s * (x - a_t * x0) / s_t)


def student_grid(steps: int, repeats: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fine = time_grid(2 * steps).double()
    i = 2 * torch.arange(steps).repeat(repeats)
    return fine[i], fine[i + 1], fine[i + 2]


@pytest.mark.parametrize("kind", KINDS)
def test_one_student_step_with_the_target_lands_on_two_teacher_steps(kind: str) -> None:
    path = NoisePath(kind)  # type: ignore[arg-type]
    mean = torch.tensor([0.5, -1.0], dtype=torch.float64)
    teacher_fn, _ = gaussian(path, mean, 0.7)  # a denoiser that is not constant along the ODE
    teacher: Denoiser = frozen_copy(Denoiser(Analytic(path, teacher_fn), path))  # type: ignore[assignment]
    ctx = DiffusionContext(
        path, (2,), 0, teacher, 1.0, lambda i, g: Denoiser(ToyMLP(hidden=8, layers=1), path)
    )
    method = Progressive(ctx, ProgressiveConfig(start_steps=8, steps=1))
    method.set_total_steps(30)
    assert method.round_steps() == 4
    t, mid, s = student_grid(4, 8)
    x = path.noisy(
        mean + 0.7 * torch.randn(32, 2, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64), t
    )
    target = method.target(x, t, mid, s, None)
    landed = two_ddim_steps(lambda z, tt: teacher.x0(z, tt), path, x, [t, mid, s])
    torch.testing.assert_close(one_ddim_step(path, target, x, t, s), landed, atol=1e-9, rtol=1e-9)
    last = s == 0
    assert bool(last.any())  # s = 0: the target is the two-step point itself
    torch.testing.assert_close(target[last], landed[last], atol=1e-12, rtol=0)
    # not a single teacher step in disguise
    assert (target - teacher.x0(x, t)).abs().max() > 1e-2


def test_after_round_zero_the_target_comes_from_the_previous_model_not_the_teacher() -> None:
    path = NoisePath("vp")
    teacher_fn, _ = gaussian(path, torch.tensor([0.5, -1.0]), 0.7)
    other_fn, _ = gaussian(path, torch.tensor([-2.0, 1.0]), 0.3)
    teacher: Denoiser = frozen_copy(Denoiser(Analytic(path, teacher_fn), path))  # type: ignore[assignment]
    ctx = DiffusionContext(path, (2,), 0, teacher, 1.0, lambda i, g: Denoiser(Analytic(path, other_fn), path))  # type: ignore[arg-type]
    method = Progressive(ctx, ProgressiveConfig(start_steps=8, steps=1))
    method.set_total_steps(3)
    method.after_step(Phase("main"), 0)  # 1 of 3 steps done: round 1, previous = the student
    assert method.round == 1 and method.round_steps() == 2
    t, mid, s = student_grid(2, 4)
    x = torch.randn(8, 2, dtype=torch.float64)
    landed = two_ddim_steps(lambda z, tt: other_fn(z, tt), path, x, [t, mid, s])
    torch.testing.assert_close(one_ddim_step(path, method.target(x, t, mid, s, None), x, t, s), landed)


@pytest.mark.parametrize("kind", KINDS)
def test_prepare_draws_grid_points_and_regresses_the_native_output(kind: str) -> None:
    ctx = mlp_context(kind, classes=3)
    ctx.guidance = 2.0
    method = Progressive(ctx, ProgressiveConfig(start_steps=8, steps=2))
    method.set_total_steps(10)
    torch.manual_seed(1)
    y = torch.randint(0, 3, (64,))
    e = method.prepare(ClassifierBatch(torch.randn(64, 2), y, torch.arange(64)), Phase("main")).extra
    fine = time_grid(8)
    assert set(e["t"].tolist()) == set(fine[0:8:2].tolist()) and float(e["t"].min()) > 0
    torch.testing.assert_close(e["s"], e["t"] - 0.25, atol=1e-6, rtol=0)
    assert ctx.teacher is not None
    teacher = ctx.teacher

    def guided(z: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        cond, uncond = teacher.x0(z.float(), tt.float(), y), teacher.x0(z.float(), tt.float(), None)
        return (uncond + 2.0 * (cond - uncond)).double()

    t, mid, s = e["t"].double(), e["mid"].double(), e["s"].double()
    landed = two_ddim_steps(guided, ctx.path, e["xt"].double(), [t, mid, s])
    stepped = one_ddim_step(ctx.path, e["target_x0"].double(), e["xt"].double(), t, s)
    torch.testing.assert_close(stepped, landed, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        ctx.path.x0(e["target"], e["xt"], e["t"]), e["target_x0"], atol=1e-4, rtol=1e-4
    )


def snapshots(method: Progressive) -> list[tuple[int, int, list[torch.Tensor], list[torch.Tensor]]]:
    """Record (done, round, student, previous) after every optimizer step."""
    log: list[tuple[int, int, list[torch.Tensor], list[torch.Tensor]]] = []
    inner = method.after_step

    def hook(phase: Phase, step: int) -> None:
        inner(phase, step)
        weights = [p.detach().clone() for p in method.student.parameters()]
        log.append(
            (step + 1, method.round, weights, [p.detach().clone() for p in method.previous.parameters()])
        )

    method.after_step = hook  # type: ignore[method-assign]
    return log


def stream(n: int = 256) -> TensorStream:
    g = torch.Generator().manual_seed(2)
    return TensorStream(
        torch.randn(n, 2, generator=g), torch.zeros(n, dtype=torch.long), torch.arange(n), 32, 0
    )


def test_rounds_switch_on_schedule_and_freeze_the_student(tmp_path: Path) -> None:
    method = Progressive(mlp_context("flow"), ProgressiveConfig(start_steps=8, steps=1))
    assert method.rounds == 3
    method.set_total_steps(9)
    log = snapshots(method)
    result = train(
        method=method, stream=stream(), cfg=TrainConfig(steps=9, lr=1e-2, threads=1), out_dir=tmp_path, seed=0
    )
    assert [r for _, r, _, _ in log] == [0, 0, 1, 1, 1, 2, 2, 2, 2]  # after each step
    assert [h["round"] for h in result.history] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # during each step
    by_done = {d: (st, pr) for d, _, st, pr in log}
    for boundary, until in ((3, 5), (6, 9)):
        frozen = by_done[boundary][0]  # the student when the round began
        for done in range(boundary, until + 1):
            assert all(torch.equal(a, b) for a, b in zip(by_done[done][1], frozen, strict=True)), done
        assert any(not torch.equal(a, b) for a, b in zip(by_done[until][0], frozen, strict=True))
    assert method.round_steps() == 1


def test_resume_is_exact_across_a_round_boundary(tmp_path: Path) -> None:
    """8 steps in 2 rounds (the switch after 4), killed after the step-6 checkpoint: the resumed run
    ends with the uninterrupted run's student and previous model, bit for bit."""

    def run(out: Path, resume: bool) -> tuple[Progressive, int | None]:
        method = Progressive(mlp_context("vp"), ProgressiveConfig(start_steps=4, steps=1))
        method.set_total_steps(8)
        cfg = TrainConfig(steps=8, lr=1e-2, checkpoint_every=6, threads=1)
        result = train(method=method, stream=stream(), cfg=cfg, out_dir=out, seed=0, resume=resume)
        return method, result.resumed_from

    whole, _ = run(tmp_path / "a", False)
    killed = tmp_path / "b"
    shutil.copytree(tmp_path / "a", killed)
    resumed, start = run(killed, True)
    assert start == 6
    assert whole.round == resumed.round == 1
    for a, b in zip(whole.student.state_dict().values(), resumed.student.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(
        whole.previous.state_dict().values(), resumed.previous.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_state_dict_round_trip(tmp_path: Path) -> None:
    method = Progressive(mlp_context("edm"), ProgressiveConfig(start_steps=4, steps=1))
    assert "previous" not in method.state_dict() and method.state_dict()["round"] == 0
    method.set_total_steps(2)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.5)
    method.after_step(Phase("main"), 0)
    torch.save(method.state_dict(), tmp_path / "s.pt")
    fresh = Progressive(mlp_context("edm"), ProgressiveConfig(start_steps=4, steps=1))
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert fresh.round == 1
    for a, b in zip(fresh.previous.state_dict().values(), method.student.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert "previous" in fresh.frozen_modules()


def test_several_rounds_need_the_run_length() -> None:
    method = Progressive(mlp_context("flow"), ProgressiveConfig(start_steps=4, steps=1))
    with pytest.raises(RuntimeError, match="set_total_steps"):
        method.prepare(
            ClassifierBatch(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), torch.arange(4)),
            Phase("main"),
        )
    one = Progressive(mlp_context("flow"), ProgressiveConfig(start_steps=2, steps=1))
    assert (
        one.rounds == 1
        and one.prepare(
            ClassifierBatch(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), torch.arange(4)),
            Phase("main"),
        )
        .extra["t"]
        .eq(1)
        .all()
    )


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path: Path) -> None:
    method = Progressive(mlp_context("flow"), ProgressiveConfig(start_steps=4, steps=2, init="scratch"))
    assert method.sampler == "ode" and method.sample_steps == 2 and method.rounds == 1
    torch.manual_seed(7)
    fixed = method.prepare(
        ClassifierBatch(torch.randn(256, 2), torch.zeros(256, dtype=torch.long), torch.arange(256)),
        Phase("main"),
    )

    def loss() -> float:
        e = fixed.extra
        with torch.no_grad():
            return float((method.student(e["xt"], e["t"]) - e["target"]).pow(2).mean())

    before = loss()
    train(
        method=method,
        stream=stream(),
        cfg=TrainConfig(steps=100, lr=3e-3, threads=1),
        out_dir=tmp_path,
        seed=0,
    )
    assert loss() < 0.3 * before, (before, loss())
