"""Consistency distillation (Song et al. 2023): a function f(x_t, t) that maps every point of a teacher
ODE trajectory to the trajectory's end, so one evaluation replaces the whole ODE solve. It is learned
from neighbouring points only: f at x_{t_{n+1}} must match an EMA target network's f at the point one
teacher solver step (Euler or Heun) closer to the data; the boundary f(x, 0) = x anchors the chain.

Grid: t_n = n / N for n = 0..N on the path's axis (`time_grid(N)`; for EDM the Karras grid, whose t = 0
is sigma_min, the paper's epsilon). Pairs (t_{n+1}, t_n) use n uniform in 0..N-1; for n = 0 the teacher
step lands on its own x0 (the samplers' last step) and the target is that point itself.

Parameterisation: f(x, t) = c_skip(t) x + (1 - c_skip(t)) x0_theta(x, t) with c_skip(t) = max(0, 1 - t N).
It is exactly the identity at t = 0 on every path (the skip makes it so, not EDM's c_skip(sigma_min) ~ 1)
and exactly the network's x0 at every grid point t >= t_1, the only other times the loss and a sampler
of at most N steps evaluate. So a student initialised from the teacher starts as the teacher's denoiser,
the network is never asked for an amplified output (an EDM-style c_skip(t) = s_d^2 / (s_d^2 + sigma^2)
would be ~1 at flow's coarse t_1 and force x0_theta to undo it), and the exported folder, sampled with
the consistency sampler at <= N steps, reproduces f without knowing the skip.

Distance: pseudo-Huber sqrt(|a - b|^2 + c^2) - c with c = 0.00054 sqrt(d) (improved CT), or the mean
squared error; the loss weight is 1 (as in the CD paper)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from distill.classifier.batches import ClassifierBatch
from distill.configs.diffusion import ConsistencyConfig
from distill.diffusion.models import Denoiser, x0_of
from distill.diffusion.paths import NoisePath, time_grid
from distill.diffusion.sampling import LabelledX0Fn
from distill.methods.base import METHODS, Phase, StepContext
from distill.methods.diffusion.base import DiffusionContext, DiffusionMethod, ema_update, frozen_copy
from distill.methods.diffusion.progressive import ddim_rows, rows

X0 = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t per row) -> x0
HUBER_C = 0.00054  # iCT's pseudo-Huber constant, times sqrt(dimension)


def ode_step(
    path: NoisePath, x0_fn: X0, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, heun: bool
) -> torch.Tensor:
    """One deterministic solver step t -> s per row: Euler (DDIM), or Heun, which averages the (x0, eps)
    increments at both ends as the sampler's heun branch does. Rows with s = 0 take the Euler step,
    whose result is x0 (the samplers' last step is never corrected either)."""
    x0 = x0_fn(x, t)
    euler = ddim_rows(path, x0, x, t, s)
    if not heun:
        return euler
    x0_next = x0_fn(euler, s)
    da, ds = rows(path.alpha(s) - path.alpha(t), x), rows(path.sigma(s) - path.sigma(t), x)
    eps_sum = path.eps(x0, x, t) + path.eps(x0_next, euler, s)
    corrected = x + 0.5 * (da * (x0 + x0_next) + ds * eps_sum)
    return torch.where(rows(s <= 0, x), euler, corrected)


def distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row distance: pseudo-Huber (c = 0.00054 sqrt(d)) or the mean squared error."""
    diff = (a - b).flatten(1)
    if kind == "l2":
        return diff.pow(2).mean(1)
    c = HUBER_C * math.sqrt(diff.shape[1])
    return torch.sqrt(diff.pow(2).sum(1) + c * c) - c


@METHODS.register("consistency")
class Consistency(DiffusionMethod):
    name = "consistency"

    def __init__(self, ctx: DiffusionContext, cfg: ConsistencyConfig) -> None:
        super().__init__(ctx, cfg)
        self.intervals, self.mu = cfg.discretization, cfg.target_ema
        self.heun, self.distance = cfg.solver == "heun", cfg.distance
        # theta^-: the EMA of the student that gives targets (decay `target_ema`), distinct from the
        # evaluated EMA (`ema`); both checkpointed.
        self.target: Denoiser = frozen_copy(self.student)  # type: ignore[assignment]

    def c_skip(self, t: torch.Tensor) -> torch.Tensor:
        """1 at t = 0, falling linearly to 0 at t_1 = 1 / N, 0 beyond."""
        return (1.0 - t * self.intervals).clamp(0.0, 1.0)

    def consistency(self, x: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """f(x, t) from the network's x0 estimate; exactly x where t = 0, whatever x0 is."""
        c = rows(self.c_skip(t), x)
        return torch.where(c >= 1, x, c * x + (1 - c) * x0)

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {**super().frozen_modules(), "target": self.target}

    @torch.no_grad()
    def pair(
        self, x: torch.Tensor, eps: torch.Tensor, n: torch.Tensor, labels: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """x_{t_{n+1}} from data and noise, the teacher's step to x_{t_n}, and the target f there."""
        grid = time_grid(self.intervals, x.device)  # descending: t_k is grid[N - k]
        t, s = grid[self.intervals - 1 - n], grid[self.intervals - n]
        xt = self.path.noisy(x, eps, t)
        xs = ode_step(self.path, lambda z, tt: self.teacher_x0(z, tt, labels), xt, t, s, self.heun)
        target = self.consistency(xs, s, self.target.x0(xs, s, labels))
        return {"t": t, "s": s, "xt": xt, "xs": xs, "target": target}

    def prepare(self, batch: ClassifierBatch, phase: Phase) -> ClassifierBatch:
        n = torch.randint(0, self.intervals, (batch.x.shape[0],), device=batch.x.device)
        batch.extra.update(self.pair(batch.x, torch.randn_like(batch.x), n, self.labels(batch)))
        return batch

    def loss(self, ctx: StepContext, batch: ClassifierBatch) -> tuple[torch.Tensor, dict[str, float]]:
        e = batch.extra
        x0 = x0_of(ctx.modules["student"], self.path, e["xt"], e["t"], self.labels(batch))
        per_row = distance(self.consistency(e["xt"], e["t"], x0), e["target"], self.distance)
        loss = per_row.sum() / ctx.normalizer  # a share of the update's mean, as its logged part too
        return loss, {self.distance: float(loss.detach())}

    def after_step(self, phase: Phase, step: int) -> None:
        super().after_step(phase, step)
        if phase.group == self.student_group():
            ema_update(self.target, self.student, self.mu)

    def x0_fn(self, guidance: float | None = None) -> LabelledX0Fn:
        """The evaluated (EMA) model's f, which the consistency sampler uses as its x0."""
        model = self.eval_model().eval()

        def fn(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            return self.consistency(x, t, model.x0(x, t, labels))

        return fn

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "target": self.target.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "target" in state:
            self.target.load_state_dict(state["target"])
