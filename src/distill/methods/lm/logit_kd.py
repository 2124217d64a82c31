"""`logit_kd`: match the teacher's next-token distribution at every answer token.

Hinton et al. 2015 (soft targets, T^2 scaling); divergence choices from GKD (Agarwal et al. 2024: JSD(beta),
reverse KL), DistiLLM (Ko et al. 2024: skew KL) and TVD (Wen et al. 2023, f-divergence KD).
"""

from __future__ import annotations

import torch

from distill.errors import CompatibilityError
from distill.losses.fused_head import chunked_head_loss
from distill.losses.sparse import SparseTopK
from distill.losses.tokens import DivergenceSpec
from distill.methods.base import METHODS, Method, StepInput, student_rows
from distill.recipe import LogitKDConfig
from distill.teachers.base import SparseTeacherSignal, TeacherSignal


@METHODS.register("logit_kd")
class LogitKD(Method):
    name = "logit_kd"
    needs_teacher = True

    def __init__(self, cfg: LogitKDConfig) -> None:
        self.cfg = cfg
        self.spec = DivergenceSpec(
            name=cfg.divergence, temperature=cfg.temperature, beta=cfg.beta, alpha=cfg.alpha
        )

    def step(self, inp: StepInput) -> tuple[torch.Tensor, dict[str, float]]:
        assert inp.teacher is not None, "logit_kd needs a teacher"
        hidden, weight, targets, select = student_rows(inp)
        signal = inp.teacher.signal(inp.batch, select)
        if signal.num_rows != hidden.shape[0]:
            raise CompatibilityError(
                f"teacher gave {signal.num_rows} positions for {hidden.shape[0]} answer tokens"
            )
        dense = signal.logits if isinstance(signal, TeacherSignal) else None
        fresh = isinstance(signal, TeacherSignal) and signal.fresh
        sparse = None
        if isinstance(signal, SparseTeacherSignal):
            device = hidden.device
            sparse = SparseTopK(signal.ids.to(device), signal.logprobs.to(device), signal.temperature, self.cfg.tail)
        loss, parts = chunked_head_loss(
            hidden,
            weight,
            labels=targets if self.cfg.ce_weight > 0 else None,
            teacher_logits=dense,
            teacher_topk=sparse,
            spec=self.spec,
            kd_weight=self.cfg.kd_weight,
            ce_weight=self.cfg.ce_weight,
            normalizer=inp.normalizer,
            chunk_size=inp.chunk_size,
            teacher_logits_fresh=fresh,
        )
        return loss, {k: float(v) for k, v in parts.items()}
