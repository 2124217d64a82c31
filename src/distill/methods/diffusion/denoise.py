"""Denoising training: regress the network's native output (velocity, v or EDM's F) at a random noise
level. It trains the family's teachers and is the from-scratch baseline of any student."""

from __future__ import annotations

from typing import Any

import torch

from distill.classifier.batches import ClassifierBatch
from distill.configs.diffusion import DenoiseConfig
from distill.methods.base import METHODS, Phase, StepContext
from distill.methods.diffusion.base import DiffusionContext, DiffusionMethod


@METHODS.register("denoise")
class Denoise(DiffusionMethod):
    name = "denoise"

    def __init__(self, ctx: DiffusionContext, cfg: DenoiseConfig) -> None:
        super().__init__(ctx, cfg)
        self.dropout = cfg.label_dropout

    @property
    def sampler(self) -> Any:
        return "ode"

    def prepare(self, batch: ClassifierBatch, phase: Phase) -> ClassifierBatch:
        n = batch.x.shape[0]
        t = self.path.train_times(n).to(batch.x.device)
        eps = torch.randn_like(batch.x)
        batch.extra["t"], batch.extra["xt"] = t, self.path.noisy(batch.x, eps, t)
        batch.extra["target"] = self.path.output_for(batch.x, batch.extra["xt"], t)
        if self.ctx.classes > 0:
            drop = torch.rand(n, device=batch.x.device) < self.dropout
            batch.extra["labels"] = torch.where(drop, torch.full_like(batch.y, self.ctx.classes), batch.y)
        return batch

    def loss(self, ctx: StepContext, batch: ClassifierBatch) -> tuple[torch.Tensor, dict[str, float]]:
        per_row = self.native_mse(ctx, batch, batch.extra.get("labels"))
        return per_row.sum() / ctx.normalizer, {"mse": float(per_row.detach().sum()) / ctx.normalizer}
