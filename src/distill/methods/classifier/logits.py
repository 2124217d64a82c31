"""Logit methods of the classifier family: cross-entropy (the baseline), Hinton KD (optionally on
standardised logits; averaged over an ensemble of teachers), DKD and DIST."""

from __future__ import annotations

import torch

from distill.classifier.batches import ClassifierBatch
from distill.configs.classifier import CEConfig, DISTConfig, DKDConfig, KDConfig
from distill.losses.classifier_logits import (
    dist_loss,
    dkd_loss,
    ensemble_log_probs,
    kd_loss,
    kd_loss_from_log_probs,
    standardized_kd_loss,
)
from distill.methods.base import METHODS, StepContext
from distill.methods.classifier.base import ClassifierMethod


def teacher_logits_single(members: torch.Tensor) -> torch.Tensor:
    """One (B, C) logit tensor for losses defined on logits: the teacher's, or for an ensemble the log of
    its averaged probabilities (log-probabilities are valid logits)."""
    if members.shape[0] == 1:
        return members[0]
    return ensemble_log_probs(list(members), 1.0)


def hard_targets(batch: ClassifierBatch, teacher: torch.Tensor) -> torch.Tensor:
    """Labels where known, the teacher's prediction on rows whose label is withheld."""
    return torch.where(batch.labelled, batch.y, teacher.argmax(-1))


@METHODS.register("ce")
class CrossEntropy(ClassifierMethod):
    """Labels only: the baseline every KD number is read against."""

    name = "ce"
    uses_teacher = False
    uses_unlabelled = False
    cfg: CEConfig


@METHODS.register("kd")
class HintonKD(ClassifierMethod):
    name = "kd"
    cfg: KDConfig

    def extra_loss(
        self, ctx: StepContext, batch: ClassifierBatch, logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert batch.teacher_logits is not None
        members, t = batch.teacher_logits, self.cfg.temperature
        if self.cfg.standardize:
            kd = standardized_kd_loss(logits, teacher_logits_single(members), t)
        elif members.shape[0] == 1:
            kd = kd_loss(logits, members[0], t)
        else:
            kd = kd_loss_from_log_probs(logits, ensemble_log_probs(list(members), t), t)
        kd = kd.sum()
        return self.cfg.kd_weight * kd, {"kd": kd}


@METHODS.register("dkd")
class DecoupledKD(ClassifierMethod):
    name = "dkd"
    cfg: DKDConfig

    def extra_loss(
        self, ctx: StepContext, batch: ClassifierBatch, logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert batch.teacher_logits is not None
        teacher, c = teacher_logits_single(batch.teacher_logits), self.cfg
        dkd = dkd_loss(logits, teacher, hard_targets(batch, teacher), c.alpha, c.beta, c.temperature).sum()
        ramp = min(1.0, (ctx.step + 1) / c.warmup_steps) if c.warmup_steps else 1.0
        return c.kd_weight * ramp * dkd, {"dkd": dkd}


@METHODS.register("dist")
class DIST(ClassifierMethod):
    name = "dist"
    cfg: DISTConfig

    def extra_loss(
        self, ctx: StepContext, batch: ClassifierBatch, logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert batch.teacher_logits is not None
        c = self.cfg
        teacher = teacher_logits_single(batch.teacher_logits)
        value = (
            dist_loss(logits, teacher, c.beta, c.gamma, c.temperature) * logits.shape[0]
        )  # a batch mean, as a sum
        return c.kd_weight * value, {"dist": value}
