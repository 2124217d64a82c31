"""`logit_kd`: match the teacher's next-token distribution at every answer token.

Hinton et al. 2015 (soft targets, T^2 scaling); divergence choices from GKD (Agarwal et al. 2024: JSD(beta),
reverse KL), DistiLLM (Ko et al. 2024: skew KL) and TVD (Wen et al. 2023, f-divergence KD).
"""

from __future__ import annotations

import torch

from distill.configs.lm import LogitKDConfig
from distill.data.batching import Batch
from distill.errors import CompatibilityError
from distill.losses.fused_head import chunked_head_loss
from distill.losses.sparse import SparseTopK
from distill.losses.tokens import DivergenceSpec
from distill.methods.base import METHODS, StepContext
from distill.methods.lm.base import LMContext, LMMethod, StudentRows
from distill.teachers.base import AnySignal, SparseTeacherSignal, TeacherSignal


@METHODS.register("logit_kd")
class LogitKD(LMMethod):
    name = "logit_kd"
    uses_teacher = True

    def __init__(self, cfg: LogitKDConfig, ctx: LMContext) -> None:
        super().__init__(cfg, ctx)
        self.spec = DivergenceSpec(
            name=cfg.divergence, temperature=cfg.temperature, beta=cfg.beta, alpha=cfg.alpha
        )

    def loss(self, ctx: StepContext, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        teacher = self.lm.teacher
        assert teacher is not None
        rows = self.student_rows(ctx, batch)
        return self.logit_loss(ctx, rows, teacher.signal(batch, rows.select))

    def logit_loss(
        self, ctx: StepContext, rows: StudentRows, signal: AnySignal, ce_weight: float | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The divergence (plus optional CE) at the answer rows, through the fused chunked head;
        `ce_weight` overrides the config's (on-policy batches take none)."""
        ce_weight = self.cfg.ce_weight if ce_weight is None else ce_weight
        if signal.num_rows != rows.hidden.shape[0]:
            raise CompatibilityError(
                f"teacher gave {signal.num_rows} positions for {rows.hidden.shape[0]} answer tokens"
            )
        dense = signal.logits if isinstance(signal, TeacherSignal) else None
        fresh = isinstance(signal, TeacherSignal) and signal.fresh
        sparse = None
        if isinstance(signal, SparseTeacherSignal):
            device = rows.hidden.device
            sparse = SparseTopK(
                signal.ids.to(device), signal.logprobs.to(device), signal.temperature, self.cfg.tail
            )
        loss, parts = chunked_head_loss(
            rows.hidden,
            rows.weight,
            labels=rows.targets if ce_weight > 0 else None,
            teacher_logits=dense,
            teacher_topk=sparse,
            spec=self.spec,
            kd_weight=self.cfg.kd_weight,
            ce_weight=ce_weight,
            normalizer=ctx.normalizer,
            chunk_size=self.lm.chunk_size,
            teacher_logits_fresh=fresh,
        )
        return loss, {k: float(v) for k, v in parts.items()}
