"""Classifier-free-guidance distillation, stage one of Meng et al. 2023: a student that reads the
guidance scale as an input learns, in one conditional pass, the teacher's two-pass guided prediction for
every scale in a range. Sampling at a chosen scale then costs half the network calls, and the scale
stays a knob after distillation. The student starts as the teacher (its guidance embedding starts at
zero), so it begins at the teacher's scale-1 prediction."""

from __future__ import annotations

import torch

from distill.classifier.batches import ClassifierBatch
from distill.configs.diffusion import GuidanceDistillConfig
from distill.diffusion.models import Denoiser
from distill.errors import CompatibilityError
from distill.methods.base import METHODS, Phase, StepContext
from distill.methods.diffusion.base import DiffusionContext, DiffusionMethod


@torch.no_grad()
def guided_x0_rows(
    den: Denoiser, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, scales: torch.Tensor, classes: int
) -> torch.Tensor:
    """uncond + w (cond - uncond) with one scale per row; conditional and null-label passes are one
    batch of 2B rows (`classes` is the null label's index)."""
    n = x.shape[0]
    null = torch.full_like(labels, classes)
    both = den.x0(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
    cond, uncond = both[:n], both[n:]
    w = scales.to(x.dtype).reshape(n, *([1] * (x.ndim - 1)))
    return uncond + w * (cond - uncond)


@METHODS.register("cfg_distill")
class GuidanceDistill(DiffusionMethod):
    name = "cfg_distill"

    def __init__(self, ctx: DiffusionContext, cfg: GuidanceDistillConfig) -> None:
        if ctx.classes < 1:
            raise CompatibilityError("method 'cfg_distill' needs class-conditional data (data.kind: digits)")
        super().__init__(ctx, cfg)
        self.scale_range = cfg.scale_range

    def guidance_input(self) -> bool:
        return True

    def prepare(self, batch: ClassifierBatch, phase: Phase) -> ClassifierBatch:
        assert self.ctx.teacher is not None, "method cfg_distill needs a teacher"
        n, device = batch.x.shape[0], batch.x.device
        t = (1.0 - torch.rand(n, device=device)).clamp_min(1e-4)  # U(0, 1]
        xt = self.path.noisy(batch.x, torch.randn_like(batch.x), t)
        lo, hi = self.scale_range
        w = lo + (hi - lo) * torch.rand(n, device=device)
        x0 = guided_x0_rows(self.ctx.teacher, xt, t, batch.y, w, self.ctx.classes)
        e = batch.extra
        e["t"], e["xt"], e["w"], e["target_x0"] = t, xt, w, x0
        e["target"] = self.path.output_for(x0, xt, t)
        return batch

    def loss(self, ctx: StepContext, batch: ClassifierBatch) -> tuple[torch.Tensor, dict[str, float]]:
        per_row = self.native_mse(ctx, batch, batch.y, batch.extra["w"])
        return per_row.sum() / ctx.normalizer, {"mse": float(per_row.detach().mean())}
