"""The method interface: a method turns (student, batch, teacher signal) into named losses.

The engine owns everything else (devices, precision, accumulation, checkpoints), and knows methods only
through this interface and the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from distill.data.batching import IGNORE, Batch
from distill.registry import Registry
from distill.teachers.base import TeacherSource


@dataclass
class StepInput:
    student: PreTrainedModel  # unwrapped: for its LM head and config
    hidden: Callable[[Batch], torch.Tensor]  # final hidden states (B, L, H) through the engine's wrapper
    batch: Batch
    teacher: TeacherSource | None
    normalizer: float  # real loss tokens in the whole accumulated, all-process batch
    chunk_size: int
    vocab_size: int  # shared teacher/student vocabulary (the student's own when there is no teacher)


class Method(ABC):
    """A distillation method. Subclasses declare what they need and return named losses."""

    name: str = "abstract"
    needs_teacher: bool = False
    needs_generated_data: bool = False

    def modules(self) -> list[torch.nn.Module]:
        """Extra trainable modules the method owns (projections, adapters); none by default."""
        return []

    @abstractmethod
    def step(self, inp: StepInput) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the loss to back-propagate (already divided by `normalizer`) and named parts to log."""


METHODS: Registry[type[Method]] = Registry("method")


def student_rows(inp: StepInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student hidden states, head weight (sliced to the shared vocabulary), targets, and the selection mask
    at the positions that carry loss."""
    select = inp.batch.targets != IGNORE
    hidden = inp.hidden(inp.batch)[select]
    head = inp.student.get_output_embeddings()
    if head is None:
        raise ValueError("student has no LM head")
    weight = head.weight[: inp.vocab_size]
    return hidden, weight, inp.batch.targets[select], select
