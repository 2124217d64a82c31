"""The one interface every teacher signal source implements (live model now; cache and server next)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from distill.data.batching import Batch

TeacherLogitsFn = Callable[[int, int], torch.Tensor]


@dataclass
class TeacherSignal:
    """What the teacher says at the selected positions of a batch.

    `logits(start, end)` returns dense logits for rows [start, end) of the selected positions (row-major
    over the batch), produced lazily so no (N, V) tensor of the teacher ever has to exist at once.
    """

    logits: TeacherLogitsFn
    num_rows: int
    vocab_size: int


class TeacherSource(ABC):
    kind: str = "abstract"

    @abstractmethod
    def signal(self, batch: Batch, select: torch.Tensor) -> TeacherSignal:
        """Teacher distribution at positions where `select` (B, L) is True."""

    def close(self) -> None:  # noqa: B027 - optional hook; live teachers hold nothing to release
        """Release servers, files or memory."""
