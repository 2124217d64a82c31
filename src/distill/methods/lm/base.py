"""What every language-model method shares: the student as a body module the engine prepares (so
DDP synchronises through its forward), the LM head applied by the method itself at answer positions
(fused with the loss, sliced to the vocabulary teacher and student share), tokens as loss units, export
as a `from_pretrained` folder."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from distill.configs.compress import LoraConfig
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
    lora: LoraConfig | None = None  # the student carries LoRA adapters (injected by the family)
    layer_origin: list[int] | None = None  # the teacher block each student block was pruned from
    kept_channels: list[int] | None = (
        None  # the teacher embedding channel each student channel was pruned from
    )
    seed: int = 0  # the run's seed (methods that sample draw from it)
    train: list[Any] | None = None  # the tokenised training examples (a reduced draft vocabulary counts them)


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
        self.quant = _quant_spec(cfg, ctx.student)
        if self.quant is not None and cfg.quantize.mode == "qat":
            from distill.models.fake_quant import add_fake_quant

            add_fake_quant(ctx.student, self.quant)

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

    def eval_model(self) -> PreTrainedModel:
        """The student as users get it: rounded to integers after training when the method quantizes
        post-training (PTQ); fake-quantized (QAD) or with adapters, the training model already computes so."""
        if self.quant is None or self.cfg.quantize.mode != "ptq":
            return self.body.lm
        from distill.models.fake_quant import quantize_in_place

        model = copy.deepcopy(self.body.lm)
        quantize_in_place(model, self.quant)
        return model

    def export(self, folder: Path) -> None:
        """A plain `from_pretrained` folder: adapters merged (or a base folder plus `adapter/`), quantized
        weights stored as their dequantized values; projections and other helpers stay out."""
        from distill.models.loading import save_student

        model: Any = self.eval_model()
        lora = self.lm.lora
        if lora is not None:
            from distill.models.lora import base_copy, merged_copy, save_adapter

            plain: Any = merged_copy(model) if lora.merge else base_copy(model)
            save_student(plain, self.lm.tokenizer, folder)
            if not lora.merge:  # after the atomic folder swap, which would remove it
                save_adapter(model, lora, folder / "adapter")
            return
        if self.quant is not None and self.cfg.quantize.mode == "qat":
            from distill.models.fake_quant import materialize

            model = copy.deepcopy(model)
            materialize(model)
        save_student(model, self.lm.tokenizer, folder)


def _quant_spec(cfg: Any, student: PreTrainedModel) -> Any:
    """The method's weight quantization, checked against the student's layer widths (None: full precision)."""
    quantize = getattr(cfg, "quantize", None)
    if quantize is None:
        return None
    from distill.models.fake_quant import QuantSpec, check_spec

    spec = QuantSpec(bits=quantize.bits, group_size=quantize.group_size, symmetric=quantize.symmetric)
    check_spec(student, spec)
    return spec
