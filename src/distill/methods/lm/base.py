"""What every language-model method shares: the student as a body module the engine prepares (so
DDP synchronises through its forward), the LM head applied by the method itself at answer positions
(fused with the loss, sliced to the vocabulary teacher and student share), tokens as loss units, export
as a `from_pretrained` folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from distill.data.batching import IGNORE, Batch
from distill.errors import CompatibilityError
from distill.methods.base import Method, Phase, StepContext
from distill.models.body import body_hidden
from distill.teachers.base import TeacherSource


class LMBody(torch.nn.Module):
    """The student's forward as the engine trains it: the transformer body, no LM head. Running it as the
    forward of the module Accelerate prepares matters: DDP synchronises gradients through its own
    forward, so calling `model.base_model` behind its back would silently skip the all-reduce."""

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
    ) -> torch.Tensor:
        return body_hidden(self.lm, input_ids, attention_mask, position_ids)


@dataclass
class LMContext:
    """What the LM family hands each method it builds."""

    student: PreTrainedModel
    teacher: TeacherSource | None
    vocab_size: int  # shared teacher/student vocabulary (the student's own when there is no teacher)
    chunk_size: int
    tokenizer: Any = None  # saved with the exported student


@dataclass
class StudentRows:
    hidden: torch.Tensor  # (N, H) student hidden states at the positions that carry loss
    weight: torch.Tensor  # (V, H) LM head sliced to the shared vocabulary
    targets: torch.Tensor  # (N,)
    select: torch.Tensor  # (B, L) bool


class LMMethod(Method):
    """Base of the LM methods; subclasses implement `loss` with `student_rows`."""

    uses_teacher = False

    def __init__(self, cfg: Any, ctx: LMContext) -> None:
        self.cfg = cfg
        self.lm = ctx
        self.body = LMBody(ctx.student)
        if self.uses_teacher and ctx.teacher is None:
            raise CompatibilityError(f"method {self.name}: needs a teacher")

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"student": self.body}

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        teacher = self.lm.teacher.module() if self.uses_teacher and self.lm.teacher is not None else None
        return {"teacher": teacher} if teacher is not None else {}

    def loss_units(self, batch: Batch, phase: Phase) -> float:
        return float(batch.num_loss_tokens)

    def check_distributed(self, distributed_type: str, zero_stage: int | None) -> None:
        if distributed_type == "FSDP" or (distributed_type == "DEEPSPEED" and (zero_stage or 0) >= 3):
            raise CompatibilityError(
                f"{distributed_type}: the LM methods apply the student's LM head outside its wrapped forward, "
                "which sharded parameters do not allow yet; use DDP (accelerate launch --multi_gpu) or ZeRO-1/2"
            )

    def student_rows(self, ctx: StepContext, batch: Batch) -> StudentRows:
        """Student hidden states (through the prepared module), head weight, targets and the mask of the
        positions that carry loss."""
        select = batch.targets != IGNORE
        hidden = ctx.modules["student"](batch.input_ids, batch.attention_mask, batch.position_ids)[select]
        head = self.body.lm.get_output_embeddings()
        if head is None:
            raise CompatibilityError("student: the model has no LM head")
        return StudentRows(hidden, head.weight[: self.lm.vocab_size], batch.targets[select], select)

    def export(self, folder: Path) -> None:
        from distill.models.loading import save_student

        save_student(self.body.lm, self.lm.tokenizer, folder)
