"""Methods trained with plain next-token cross-entropy: `seq_kd` (on teacher-generated answers; Kim & Rush
2016, the usual baseline) and `sft` (on the dataset's own answers, no teacher)."""

from __future__ import annotations

import torch

from distill.losses.fused_head import chunked_head_loss
from distill.methods.base import METHODS, Method, StepInput, student_rows
from distill.recipe import SFTConfig, SeqKD


class _CrossEntropy(Method):
    def __init__(self, cfg: SeqKD | SFT) -> None:
        self.cfg = cfg

    def step(self, inp: StepInput) -> tuple[torch.Tensor, dict[str, float]]:
        hidden, weight, targets, _ = student_rows(inp)
        loss, parts = chunked_head_loss(
            hidden,
            weight,
            labels=targets,
            kd_weight=0.0,
            ce_weight=1.0,
            normalizer=inp.normalizer,
            chunk_size=inp.chunk_size,
        )
        return loss, {k: float(v) for k, v in parts.items()}


@METHODS.register("seq_kd")
class SeqKDMethod(_CrossEntropy):
    name = "seq_kd"
    needs_generated_data = True


@METHODS.register("sft")
class SFTMethod(_CrossEntropy):
    name = "sft"
