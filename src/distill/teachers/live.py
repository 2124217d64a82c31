"""A teacher model held in memory next to the student.

Only the transformer body runs over the whole batch; the LM head is applied lazily, chunk by chunk, at
the positions that carry loss. On short-answer chat data that skips the head on prompt and padding tokens
and never holds (B, L, V) teacher logits. The prompt prefix all rows share (chat header, system prompt)
is computed once and reused (`prefix_cache.py`).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from distill.data.batching import Batch
from distill.errors import CompatibilityError
from distill.models.body import batch_hidden
from distill.teachers.base import TeacherSignal, TeacherSource
from distill.teachers.prefix_cache import PrefixCache


class LiveTeacherSource(TeacherSource):
    kind = "live"

    def __init__(self, model: PreTrainedModel, vocab_size: int, *, prefix_cache: bool = True) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.vocab_size = vocab_size
        head = model.get_output_embeddings()
        if head is None:
            raise CompatibilityError("teacher.model: the teacher has no LM head (a causal LM is needed)")
        self.head = head
        self.prefix = PrefixCache(model) if prefix_cache else None

    def module(self) -> torch.nn.Module:
        return self.model

    @torch.no_grad()
    def signal(self, batch: Batch, select: torch.Tensor) -> TeacherSignal:
        full = self.prefix.hidden(batch) if self.prefix is not None else batch_hidden(self.model, batch)
        return self._lazy_logits(full[select])

    @torch.no_grad()
    def full_signal(self, batch: Batch, select: torch.Tensor) -> TeacherSignal:
        """`signal` with every position run through the model, none reused from the prefix cache, so that
        hooks on the teacher's blocks (hidden-state and relation losses) see whole sequences."""
        return self._lazy_logits(batch_hidden(self.model, batch)[select])

    def _lazy_logits(self, hidden: torch.Tensor) -> TeacherSignal:
        vocab = self.vocab_size

        def logits(start: int, end: int) -> torch.Tensor:
            with torch.no_grad():
                return self.head(hidden[start:end])[:, :vocab].float()  # a new tensor every call

        return TeacherSignal(logits=logits, num_rows=hidden.shape[0], vocab_size=vocab, fresh=True)
