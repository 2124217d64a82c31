"""Structure-code distillation from a GNN into an MLP (after VQGraph, Yang et al. 2024). Class soft labels
tell the MLP what the GNN predicts; soft assignments to a codebook of the GNN's hidden states tell it
which local structure each node sits in, something node features alone do not show. The student's tapped
features are projected into the codebook's space and their assignment (softmax over negative squared
distances) matched to the teacher's with KL; the projector is dropped at export."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.classifier.batches import ClassifierBatch
from distill.classifier.hooks import FeatureTaps
from distill.configs.classifier import VQGraphConfig
from distill.errors import RecipeError
from distill.losses.classifier_logits import kd_loss
from distill.methods.base import METHODS, Phase, StepContext
from distill.methods.classifier.base import ClassifierContext, ClassifierMethod
from distill.methods.classifier.features import probe_shapes
from distill.methods.classifier.logits import teacher_logits_single
from distill.methods.classifier.projectors import VectorProjector, as_vector


def code_log_probs(points: torch.Tensor, codebook: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax over codes of -||p - c||^2 / T (the same rule makes the teacher's targets)."""
    return F.log_softmax(-torch.cdist(points, codebook).pow(2) / temperature, dim=-1)


@METHODS.register("vqgraph")
class VQGraph(ClassifierMethod):
    name = "vqgraph"
    cfg: VQGraphConfig

    def __init__(
        self, ctx: ClassifierContext, cfg: VQGraphConfig, codebook: torch.Tensor, code_targets: torch.Tensor
    ) -> None:
        super().__init__(ctx, cfg)
        try:
            shape = probe_shapes(ctx.student, [cfg.student_layer], ctx.spec["in_shape"], "student")[
                cfg.student_layer
            ]
        except ValueError as err:
            raise RecipeError(f"student_layer: {err}") from None
        self.codebook = codebook.detach().float()
        self.code_targets = code_targets.detach().float()  # (N, codes) log-probabilities, by node
        self.projector = VectorProjector(as_vector(torch.zeros(shape)).shape[1], codebook.shape[1])
        self.taps = FeatureTaps(ctx.student, [cfg.student_layer], "student")

    def extras(self) -> dict[str, torch.nn.Module]:
        return {"projector": self.projector}

    def prepare(self, batch: ClassifierBatch, phase: Phase) -> ClassifierBatch:
        batch = super().prepare(batch, phase)
        batch.extra["codes"] = self.code_targets[batch.index.cpu()].to(batch.x.device)
        return batch

    def extra_loss(
        self, ctx: StepContext, batch: ClassifierBatch, logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert batch.teacher_logits is not None
        c = self.cfg
        kd = kd_loss(logits, teacher_logits_single(batch.teacher_logits), c.temperature).sum()
        points = ctx.modules["projector"](self.taps.take(c.student_layer))
        student = code_log_probs(points, self.codebook.to(points.device), c.code_temperature)
        target = batch.extra["codes"]
        code = (target.exp() * (target - student)).sum()
        return c.kd_weight * kd + c.code_weight * code, {"kd": kd, "code": code}
