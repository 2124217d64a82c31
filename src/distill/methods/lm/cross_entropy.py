"""Methods trained with plain next-token cross-entropy: `seq_kd` (on teacher-generated answers; Kim & Rush
2016, the usual baseline) and `sft` (on the dataset's own answers, no teacher)."""

from __future__ import annotations

import torch

from distill.data.batching import Batch
from distill.losses.fused_head import chunked_head_loss
from distill.methods.base import METHODS, StepContext
from distill.methods.lm.base import LMMethod


class _CrossEntropy(LMMethod):
    def loss(self, ctx: StepContext, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        rows = self.student_rows(ctx, batch)
        loss, parts = chunked_head_loss(
            rows.hidden,
            rows.weight,
            labels=rows.targets,
            kd_weight=0.0,
            ce_weight=1.0,
            normalizer=ctx.normalizer,
            chunk_size=self.lm.chunk_size,
        )
        return loss, {k: float(v) for k, v in parts.items()}


@METHODS.register("seq_kd")
class SeqKDMethod(_CrossEntropy):
    name = "seq_kd"


@METHODS.register("sft")
class SFTMethod(_CrossEntropy):
    name = "sft"
