"""Progressive distillation (Salimans & Ho 2022): rounds that each halve the sampler's step count. In
round r the student learns to take, in one step, the two DDIM steps of the previous round's model (the
guided teacher in round 0), so after `rounds` rounds `start_steps` steps become `steps`. Each round's
target is a deterministic two-step sample, not noisy data, so one step can match it exactly; halving
only once per round keeps every target close to what the student can already do.

The engine hands a method no run length, so the family tells it with `set_total_steps` and the rounds
split that evenly; rounds switch in `after_step`, which sees the step index. The previous round's model
and the round index are checkpointed, so a resumed run continues exactly."""

from __future__ import annotations

from typing import Any

import torch

from distill.classifier.batches import ClassifierBatch
from distill.configs.diffusion import ProgressiveConfig
from distill.diffusion.models import Denoiser
from distill.diffusion.paths import NoisePath, time_grid
from distill.methods.base import METHODS, Phase, StepContext
from distill.methods.diffusion.base import DiffusionContext, DiffusionMethod, frozen_copy


def rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row (B,) tensor shaped to broadcast against a (B, ...) batch (values in its dtype; masks
    stay boolean)."""
    v = v if v.dtype == torch.bool else v.to(like.dtype)
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def ddim_rows(
    path: NoisePath, x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """`path.ddim_step` with a target level per row: rows with s = 0 land on x0 (the samplers' last
    step) even where other rows do not, which matters for EDM, whose t = 0 is sigma_min, not 0."""
    return torch.where(rows(s <= 0, x), x0, path.ddim_step(x0, x, t, s))


def x0_between(
    path: NoisePath, x_t: torch.Tensor, t: torch.Tensor, x_s: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """The x0 whose single DDIM step from (x_t, t) lands on x_s at s < t. The step is linear in x0:
    x_s = (alpha_s - r alpha_t) x0 + r x_t with r = sigma_s / sigma_t, so x0 = (x_s - r x_t) /
    (alpha_s - r alpha_t); the denominator is positive for s < t on every path. At s = 0 the step
    returns x0 itself, so the answer is x_s."""
    r = rows(path.sigma(s) / path.sigma(t), x_t)
    den = rows(path.alpha(s), x_t) - r * rows(path.alpha(t), x_t)
    return torch.where(rows(s <= 0, x_t), x_s, (x_s - r * x_t) / den)


@METHODS.register("progressive")
class Progressive(DiffusionMethod):
    """The loss is the squared error of the network's native output (velocity, v or EDM's F) against
    the output whose x0 is the two-step target. In x0 terms that weights the error by 1 / t^2 (flow),
    1 + SNR (VP with v-prediction: the paper's "SNR+1" weighting) and EDM's lambda(sigma): each path's
    own denoising weighting, on the scale the teacher was trained at, with one code path for all
    three. Targets sit on grid points t >= 1 / N, so the weights stay finite."""

    name = "progressive"

    def __init__(self, ctx: DiffusionContext, cfg: ProgressiveConfig) -> None:
        super().__init__(ctx, cfg)
        self.start_steps, self.rounds = cfg.start_steps, cfg.rounds
        self.round = 0
        self.total_steps: int | None = None
        # The previous round's frozen model; unused in round 0, where the guided teacher gives targets.
        self.previous: Denoiser = frozen_copy(self.student)  # type: ignore[assignment]

    def set_total_steps(self, steps: int) -> None:
        """The run's optimizer steps (train.steps), split evenly over the rounds."""
        if steps < 1:
            raise ValueError(f"total steps must be >= 1, got {steps}")
        self.total_steps = steps

    def round_of(self, done: int) -> int:
        """The round that runs after `done` optimizer steps."""
        if self.rounds == 1:
            return 0
        if self.total_steps is None:
            raise RuntimeError(  # a wiring bug, not a recipe problem
                f"method progressive: {self.rounds} rounds need the run's length; the family must call "
                "set_total_steps(train.steps) before training"
            )
        return min(done * self.rounds // self.total_steps, self.rounds - 1)

    def round_steps(self, r: int | None = None) -> int:
        """The student's step count in round r (N = start_steps / 2^(r+1)); its targets come from 2N."""
        return self.start_steps >> ((self.round if r is None else r) + 1)

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {**super().frozen_modules(), "previous": self.previous}

    def previous_x0(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.round == 0:
            return self.teacher_x0(x, t, labels)
        return self.previous.x0(x, t, labels)

    @torch.no_grad()
    def target(
        self,
        xt: torch.Tensor,
        t: torch.Tensor,
        mid: torch.Tensor,
        s: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> torch.Tensor:
        """x0~: two DDIM steps of the previous model (t -> mid -> s) folded into one step t -> s."""
        x_mid = ddim_rows(self.path, self.previous_x0(xt, t, labels), xt, t, mid)
        x_s = ddim_rows(self.path, self.previous_x0(x_mid, mid, labels), x_mid, mid, s)
        return x0_between(self.path, xt, t, x_s, s)

    def prepare(self, batch: ClassifierBatch, phase: Phase) -> ClassifierBatch:
        self.round_of(0)  # refuse before any work when the run's length is unknown
        n, device = batch.x.shape[0], batch.x.device
        steps = self.round_steps()
        # The previous model's 2N-step grid; the student's N-step grid is every other point of it.
        fine = time_grid(2 * steps, device)
        i = 2 * torch.randint(0, steps, (n,), device=device)
        t, mid, s = fine[i], fine[i + 1], fine[i + 2]
        xt = self.path.noisy(batch.x, torch.randn_like(batch.x), t)
        x0 = self.target(xt, t, mid, s, self.labels(batch))
        e = batch.extra
        e["t"], e["mid"], e["s"], e["xt"], e["target_x0"] = t, mid, s, xt, x0
        e["target"] = self.path.output_for(x0, xt, t)
        return batch

    def loss(self, ctx: StepContext, batch: ClassifierBatch) -> tuple[torch.Tensor, dict[str, float]]:
        per_row = self.native_mse(ctx, batch, self.labels(batch))
        loss = per_row.sum() / ctx.normalizer
        # Parts as shares of the update's mean, so the engine's sum over micro-batches and processes is
        # the mean (the round index included).
        rows_share = per_row.shape[0] / ctx.normalizer
        return loss, {"mse": float(loss.detach()), "round": self.round * rows_share}

    def after_step(self, phase: Phase, step: int) -> None:
        super().after_step(phase, step)
        if phase.group != self.student_group():
            return
        r = self.round_of(step + 1)
        if r != self.round:  # the student so far becomes the next round's frozen previous model
            self.previous.load_state_dict(self.student.state_dict())
            self.round = r

    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), "round": self.round}
        if self.round > 0:
            state["previous"] = self.previous.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.round = int(state.get("round", 0))
        if "previous" in state:
            self.previous.load_state_dict(state["previous"])
