"""Reflow (rectified flow, Liu et al. 2023) on any noise path: the teacher's deterministic ODE couples
each noise draw to a sample, and the student regresses the path's interpolant between the two. A coupled
pair's interpolant is what a few-step sampler can follow without crossing other trajectories, so the
student needs far fewer steps than the teacher whose curved ODE it straightens. Pairs are fresh every
batch (online reflow): no stored pair set to size or go stale."""

from __future__ import annotations

import torch

from distill.classifier.batches import ClassifierBatch
from distill.configs.diffusion import ReflowConfig
from distill.diffusion.paths import NoisePath
from distill.diffusion.sampling import sample_chain
from distill.methods.base import METHODS, Phase, StepContext
from distill.methods.diffusion.base import DiffusionContext, DiffusionMethod


def prior_scale(path: NoisePath) -> float:
    """The standard deviation of `path.prior` (EDM's largest sigma; 1 for flow and VP)."""
    return path.sigma_max if path.kind == "edm" else 1.0


@METHODS.register("reflow")
class Reflow(DiffusionMethod):
    name = "reflow"

    def __init__(self, ctx: DiffusionContext, cfg: ReflowConfig) -> None:
        super().__init__(ctx, cfg)
        self.teacher_steps = cfg.teacher_steps

    @torch.no_grad()
    def couple(self, noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The teacher's ODE sample from `noise` (at the prior's scale): deterministic given the noise."""
        return sample_chain(
            lambda x, t: self.teacher_x0(x, t, labels), self.path, noise, self.teacher_steps, "ode"
        )

    def prepare(self, batch: ClassifierBatch, phase: Phase) -> ClassifierBatch:
        n, device = batch.x.shape[0], batch.x.device
        labels = self.labels(batch)
        eps = torch.randn_like(batch.x)
        sample = self.couple(eps * prior_scale(self.path), labels)
        t = torch.rand(n, device=device).clamp(1e-4, 1.0)
        xt = self.path.noisy(sample, eps, t)
        e = batch.extra
        e["eps"], e["sample"], e["t"], e["xt"] = eps, sample, t, xt
        e["target"] = self.path.output_for(sample, xt, t)
        return batch

    def loss(self, ctx: StepContext, batch: ClassifierBatch) -> tuple[torch.Tensor, dict[str, float]]:
        per_row = self.native_mse(ctx, batch, self.labels(batch))
        return per_row.sum() / ctx.normalizer, {"mse": float(per_row.detach().sum()) / ctx.normalizer}
