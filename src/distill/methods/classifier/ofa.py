"""One-for-All (Hao et al. 2023) for heterogeneous teacher/student pairs: intermediate features of a CNN
and a ViT live in different spaces, but logits do not. Each named student stage gets an exit branch
(pooled features, layer norm, linear to the classes; simpler than the paper's stage-shaped branches)
whose logits the teacher supervises with OFA's target-modulated loss, as are the final logits."""

from __future__ import annotations

import torch

from distill.classifier.batches import ClassifierBatch
from distill.classifier.hooks import FeatureTaps
from distill.configs.classifier import OFAConfig
from distill.errors import RecipeError
from distill.losses.features import ofa_loss
from distill.methods.base import METHODS, StepContext
from distill.methods.classifier.base import ClassifierContext, ClassifierMethod
from distill.methods.classifier.features import probe_shapes
from distill.methods.classifier.logits import hard_targets, teacher_logits_single
from distill.methods.classifier.projectors import ProjectorBank, as_vector


class ExitBranch(torch.nn.Module):
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.norm, self.linear = torch.nn.LayerNorm(width), torch.nn.Linear(width, classes)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(as_vector(feat)))


@METHODS.register("ofa")
class OneForAll(ClassifierMethod):
    name = "ofa"

    def __init__(self, ctx: ClassifierContext, cfg: OFAConfig) -> None:
        super().__init__(ctx, cfg)
        try:
            shapes = probe_shapes(ctx.student, cfg.stages, ctx.spec["in_shape"], "student")
        except ValueError as err:
            raise RecipeError(f"ofa: {err}") from None
        branches = {
            str(i): ExitBranch(as_vector(torch.zeros(shapes[p])).shape[1], ctx.classes)
            for i, p in enumerate(cfg.stages)
        }
        self.branches = ProjectorBank(branches)
        self.taps = FeatureTaps(ctx.student, cfg.stages, "student")

    def extras(self) -> dict[str, torch.nn.Module]:
        return {"branches": self.branches}

    def extra_loss(
        self, ctx: StepContext, batch: ClassifierBatch, logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert batch.teacher_logits is not None
        teacher = teacher_logits_single(batch.teacher_logits)
        target = hard_targets(batch, teacher)
        c = self.cfg
        exits = ctx.modules["branches"]({str(i): self.taps.take(p) for i, p in enumerate(c.stages)})
        value = ofa_loss(logits, teacher, target, c.temperature, c.eps_exponent).sum()
        for branch_logits in exits.values():
            value = value + ofa_loss(branch_logits, teacher, target, c.temperature, c.eps_exponent).sum()
        return c.ofa_weight * value, {"ofa": value}
