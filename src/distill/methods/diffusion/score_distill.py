"""Score distillation: a one- or few-step generator pulled toward the teacher's distribution by the
difference between the teacher's score and a "fake" score network fitted online to the generator's own
samples (DMD2, VSD, SiD share everything but the generator loss).

Two optimizer groups, two-timescale: `critic_updates` denoising updates of the fake network on fresh,
detached generator samples, then one generator update. The generator is listed first, so the base
class's EMA follows it. In the generator phase the fake network is called unwrapped: it is not stepped
there (the engine zeroes every group's gradients after each update), and only SiD needs its graph at all
(the gradient with respect to its input); DMD and VSD read both scores without a graph.

Weightings (per sample, all normalisers detached):
- DMD: (fake - real) / mean|x_g - real|, the paper's normalisation (`losses.diffusion.dmd_surrogate`).
- VSD: the update on x_g is s(t)^2 (eps_real - eps_fake), s(t)^2 = sigma^2 / (alpha^2 + sigma^2) the
  noise fraction of the variance-preserving path with the same signal-to-noise ratio: DreamFusion /
  ProlificDreamer's w(t) = sigma_t^2 with d x_t / d x_g folded in, as they do. On VP it is exactly
  sigma^2; written through the SNR it stays bounded on EDM (sigma up to 80) and flow.
- SiD: 1 / mean|x_g - real| as in the authors' code, and the faithful gradient: through x_g directly
  and through both score networks evaluated at x_t(x_g) (frozen, not stepped).
"""

from __future__ import annotations

import torch

from distill.classifier.batches import ClassifierBatch
from distill.configs.diffusion import SiDConfig, VSDConfig, _ScoreDistillConfig
from distill.diffusion.models import Denoiser, x0_of
from distill.diffusion.paths import time_grid
from distill.errors import CompatibilityError
from distill.losses.diffusion import sid_loss, vsd_surrogate
from distill.methods.base import METHODS, Phase, StepContext
from distill.methods.diffusion.base import DiffusionContext, DiffusionMethod

Parts = dict[str, float]


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


class ScoreDistill(DiffusionMethod):
    """The shared machinery; subclasses write `generator_loss`."""

    name = "score_distill"

    def __init__(self, ctx: DiffusionContext, cfg: _ScoreDistillConfig) -> None:
        if ctx.teacher is None:
            raise ValueError(f"method {cfg.name} needs a teacher")
        super().__init__(ctx, cfg)
        self.sd = cfg
        self.fake: Denoiser = ctx.make_student("teacher", False)

    # -------------------------------------------------------------- structure

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"student": self.student, "fake": self.fake}

    def groups(self) -> dict[str, list[str]]:
        return {"generator": ["student"], "critic": ["fake"]}

    def phases(self) -> list[Phase]:
        return [Phase("critic", self.sd.critic_updates), Phase("generator", 1)]

    def check_distributed(self, distributed_type: str, zero_stage: int | None) -> None:
        if distributed_type == "FSDP" or (distributed_type == "DEEPSPEED" and (zero_stage or 0) >= 3):
            raise CompatibilityError(
                f"{distributed_type}: method {self.cfg.name} runs the generator (sampling) and the fake score "
                "network (generator phase) outside their wrapped forwards, which sharded parameters do not "
                "allow; use DDP (accelerate launch --multi_gpu) or ZeRO-1/2"
            )

    # -------------------------------------------------------------- preparation (no grad)

    def noise_levels(self, n: int, device: torch.device) -> torch.Tensor:
        return self.sd.t_min + (self.sd.t_max - self.sd.t_min) * torch.rand(n, device=device)

    @torch.no_grad()
    def generator_inputs(
        self, batch: ClassifierBatch, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_in, t_in): what the generator denoises. One step: prior noise at t = 1. k steps: a random
        level t_i (i < k) of the k-step grid per sample, reached by the current generator's own
        consistency chain from noise (backward simulation) or by noising the real batch."""
        x, n, device = batch.x, batch.x.shape[0], batch.x.device
        noise = self.path.prior(tuple(x.shape)).to(device=device, dtype=x.dtype)
        k = self.cfg.steps
        if k == 1:
            return noise, torch.ones(n, device=device)
        grid = time_grid(k, device)
        level = torch.randint(0, k, (n,), device=device)
        t_in = grid[level]
        if not self.sd.backward_simulation:
            noised = self.path.noisy(x, torch.randn_like(x), t_in)
            return torch.where(_rows(level == 0, x), noise, noised), t_in
        out, cur = noise, noise
        for j in range(1, int(level.max()) + 1):
            x0 = self.student.x0(cur, grid[j - 1].expand(n), labels)
            cur = self.path.noisy(x0, torch.randn_like(x0), grid[j].expand(n))
            out = torch.where(_rows(level == j, x), cur, out)
        return out, t_in

    @torch.no_grad()
    def prepare(self, batch: ClassifierBatch, phase: Phase) -> ClassifierBatch:
        labels = self.labels(batch)
        e = batch.extra
        e["x_in"], e["t_in"] = self.generator_inputs(batch, labels)
        e["t"], e["eps"] = self.noise_levels(batch.x.shape[0], batch.x.device), torch.randn_like(batch.x)
        if phase.group == "critic":
            x_g = self.student.x0(e["x_in"], e["t_in"], labels)
            e["x_g"], e["xt"] = x_g, self.path.noisy(x_g, e["eps"], e["t"])
            e["target"] = self.path.output_for(x_g, e["xt"], e["t"])
        self.prepare_more(batch, phase)
        return batch

    def prepare_more(self, batch: ClassifierBatch, phase: Phase) -> None:  # noqa: B027 - optional hook
        """Extra no-grad preparation of a subclass (DMD2's regression pairs and real samples)."""

    # -------------------------------------------------------------- losses

    def loss(self, ctx: StepContext, batch: ClassifierBatch) -> tuple[torch.Tensor, Parts]:
        if ctx.phase.group == "critic":
            per_row, parts = self.critic_loss(ctx, batch)
        else:
            e = batch.extra
            x_g = x0_of(ctx.modules["student"], self.path, e["x_in"], e["t_in"], self.labels(batch))
            per_row, parts = self.generator_loss(ctx, batch, x_g)
        return per_row.sum() / ctx.normalizer, parts

    def critic_loss(self, ctx: StepContext, batch: ClassifierBatch) -> tuple[torch.Tensor, Parts]:
        """The fake network's denoising loss on the detached generator samples (native output)."""
        per_row = self.native_mse(ctx, batch, self.labels(batch), module="fake")
        return per_row, {"denoise": float(per_row.detach().mean())}

    def generator_loss(
        self, ctx: StepContext, batch: ClassifierBatch, x_g: torch.Tensor
    ) -> tuple[torch.Tensor, Parts]:
        raise NotImplementedError

    def scores(
        self, x_g: torch.Tensor, batch: ClassifierBatch, graph: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, real x0, fake x0) at x_t = x_g noised with the prepared (eps, t); with `graph` both
        x0 estimates keep their graph back to x_g (networks frozen: only the input gets a gradient)."""
        e, labels = batch.extra, self.labels(batch)
        xt = self.path.noisy(x_g, e["eps"], e["t"])
        with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
            real = self.teacher_x0(xt, e["t"], labels)
            fake = self.fake.x0(xt, e["t"], labels)
        return xt, real, fake


def snr_noise_fraction(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """sigma^2 / (alpha^2 + sigma^2): 1 - alpha_bar of the VP path with the same signal-to-noise ratio."""
    return sigma**2 / (alpha**2 + sigma**2)


@METHODS.register("vsd")
class VSD(ScoreDistill):
    name = "vsd"

    def __init__(self, ctx: DiffusionContext, cfg: VSDConfig) -> None:
        super().__init__(ctx, cfg)

    def generator_loss(
        self, ctx: StepContext, batch: ClassifierBatch, x_g: torch.Tensor
    ) -> tuple[torch.Tensor, Parts]:
        t = batch.extra["t"]
        xt, real, fake = self.scores(x_g, batch)
        eps_real, eps_fake = self.path.eps(real, xt, t), self.path.eps(fake, xt, t)
        weight = snr_noise_fraction(self.path.alpha(t), self.path.sigma(t))
        per_row = vsd_surrogate(x_g, eps_real, eps_fake, weight)
        gap = (eps_real - eps_fake).detach().pow(2).flatten(1).mean(1)
        return per_row, {"vsd": float(per_row.detach().mean()), "eps_gap": float(gap.mean())}


@METHODS.register("sid")
class SiD(ScoreDistill):
    name = "sid"

    def __init__(self, ctx: DiffusionContext, cfg: SiDConfig) -> None:
        super().__init__(ctx, cfg)
        self.alpha = cfg.alpha

    def generator_loss(
        self, ctx: StepContext, batch: ClassifierBatch, x_g: torch.Tensor
    ) -> tuple[torch.Tensor, Parts]:
        _, real, fake = self.scores(x_g, batch, graph=True)
        per_row = sid_loss(x_g, real, fake, self.alpha)
        gap = (real - fake).detach().pow(2).flatten(1).mean(1)
        return per_row, {"sid": float(per_row.detach().mean()), "score_gap": float(gap.mean())}
