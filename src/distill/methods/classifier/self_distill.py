"""Self-distillation: a mean teacher (an exponential moving average of the student, updated in the
engine's after-step hook) and born-again generations (the family trains the earlier generations and
hands the last one in as the teacher; this method is the final round)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from distill.classifier.batches import ClassifierBatch
from distill.configs.classifier import BornAgainConfig, EMASelfConfig, KDConfig
from distill.losses.classifier_logits import kd_loss
from distill.methods.base import METHODS, Phase, StepContext
from distill.methods.classifier.base import ClassifierContext, ClassifierMethod
from distill.methods.classifier.logits import HintonKD


@METHODS.register("ema_self")
class EMASelfDistill(ClassifierMethod):
    name = "ema_self"
    uses_teacher = False

    def __init__(self, ctx: ClassifierContext, cfg: EMASelfConfig) -> None:
        super().__init__(ctx, cfg)
        self.ema = copy.deepcopy(ctx.student).eval().requires_grad_(False)

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"ema": self.ema}

    def prepare(self, batch: ClassifierBatch, phase: Phase) -> ClassifierBatch:
        batch = super().prepare(batch, phase)
        batch.teacher_logits = self.ema(batch.x).unsqueeze(0)
        return batch

    def extra_loss(
        self, ctx: StepContext, batch: ClassifierBatch, logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert batch.teacher_logits is not None
        c = self.cfg
        kd = kd_loss(logits, batch.teacher_logits[0], c.temperature).sum()
        ramp = min(1.0, (ctx.step + 1) / c.warmup_steps) if c.warmup_steps else 1.0
        return c.kd_weight * ramp * kd, {"kd": kd}

    def after_step(self, phase: Phase, step: int) -> None:
        with torch.no_grad():
            for e, s in zip(self.ema.parameters(), self.student.parameters(), strict=True):
                e.lerp_(s.detach(), 1 - self.cfg.decay)
            for eb, sb in zip(self.ema.buffers(), self.student.buffers(), strict=True):
                eb.copy_(sb)
        super().after_step(phase, step)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "ema": {k: v.detach().cpu().clone() for k, v in self.ema.state_dict().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "ema" in state:
            self.ema.load_state_dict(state["ema"])


@METHODS.register("born_again")
class BornAgainRound(HintonKD):
    """One born-again round: KD from the previous generation with this round's ground-truth weight."""

    name = "born_again"

    def __init__(self, ctx: ClassifierContext, cfg: BornAgainConfig, round_index: int | None = None) -> None:
        r = len(cfg.gt_weights) - 1 if round_index is None else round_index
        kd = KDConfig(temperature=cfg.temperature, kd_weight=cfg.kd_weight, ce_weight=cfg.gt_weights[r])
        super().__init__(ctx, kd)
