"""The one interface every teacher signal source implements: a live model, an offline cache, a server.

A source answers "what is the teacher's next-token distribution at these positions of this batch?" in
one of two forms: dense logits (a live model), or sparse top-k log-probabilities with the tail mass left
over (a cache or a server). Every token-distribution loss accepts both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from distill.data.batching import Batch

TeacherLogitsFn = Callable[[int, int], torch.Tensor]


@dataclass
class TeacherSignal:
    """Dense: `logits(start, end)` returns logits for rows [start, end) of the selected positions
    (row-major over the batch), produced lazily so no (N, V) tensor of the teacher exists at once."""

    logits: TeacherLogitsFn
    num_rows: int
    vocab_size: int
    fresh: bool = False  # logits() returns a new tensor per call that the consumer may overwrite


@dataclass
class SparseTeacherSignal:
    """Sparse: the teacher's top-k next tokens at each selected position.

    `logprobs` are log-probabilities normalised over the FULL vocabulary at `temperature` (the capture
    temperature), so `1 - exp(logprobs).sum(-1)` is the tail mass the top-k leave out. Rows are the
    selected positions in row-major order, as for the dense signal.
    """

    ids: torch.Tensor  # (N, k) int64 token ids
    logprobs: torch.Tensor  # (N, k) float32, sorted descending
    temperature: float
    vocab_size: int

    @property
    def num_rows(self) -> int:
        return int(self.ids.shape[0])

    def tail_mass(self) -> torch.Tensor:
        return (1.0 - self.logprobs.double().exp().sum(-1)).clamp_min(0.0).float()


AnySignal = TeacherSignal | SparseTeacherSignal


class TeacherSource(ABC):
    kind: str = "abstract"

    @abstractmethod
    def signal(self, batch: Batch, select: torch.Tensor) -> AnySignal:
        """Teacher distribution at positions where `select` (B, L) is True."""

    def module(self) -> torch.nn.Module | None:
        """The teacher's weights when they live in this process (moved to the training device)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook; live teachers hold nothing to release
        """Release servers, files or memory."""
