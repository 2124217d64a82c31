"""Sentences for the embedding family: read, tokenised once, streamed as resumable batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from distill.classifier.batches import TensorStream
from distill.data.records import read_jsonl
from distill.errors import InputError


def read_sentences(path: Path, field: str, name: str) -> list[str]:
    """One sentence per line: a JSON object's `field` (.jsonl / .json lines) or the line itself."""
    if path.suffix in (".jsonl", ".json"):
        rows = []
        try:
            for where, row in read_jsonl(path):
                value = row.get(field)
                if not isinstance(value, str) or not value.strip():
                    raise InputError(f"{where} has no text under {field!r} (data.field)")
                rows.append(value)
        except InputError as err:
            raise InputError(f"{name}: {err}") from None
    else:
        rows = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(rows) < 2:
        raise InputError(f"{name}: {path} holds {len(rows)} sentence(s); at least 2 are needed")
    return rows


def tokenise(
    tokenizer: PreTrainedTokenizerBase, sentences: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), padded to the longest row, truncated to `max_length`."""
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@dataclass
class TextBatch:
    ids: torch.Tensor  # (B, T) trimmed to the batch's longest row
    mask: torch.Tensor  # (B, T)
    index: torch.Tensor  # (B,) row ids
    teacher: dict[str, torch.Tensor] | None = None  # filled in the method's preparation

    def to(self, device: torch.device) -> TextBatch:
        moved = None if self.teacher is None else {k: v.to(device) for k, v in self.teacher.items()}
        return TextBatch(self.ids.to(device), self.mask.to(device), self.index.to(device), moved)

    def stats(self) -> dict[str, float]:
        return {
            "samples": float(self.ids.shape[0]),
            "real_tokens": float(self.mask.sum()),
            "padded_slots": float(self.mask.numel()),
        }


class TextStream:
    """The classifier family's resumable, sharded row stream over token-id rows."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, batch_size: int, seed: int) -> None:
        self.rows = TensorStream(ids, mask, torch.arange(ids.shape[0]), batch_size, seed)

    def shard(self, rank: int, world: int) -> None:
        self.rows.shard(rank, world)

    def next_batch(self) -> TextBatch:
        b = self.rows.next_batch()
        width = int(b.y.sum(1).max())
        return TextBatch(b.x[:, :width], b.y[:, :width], b.index)

    def state_dict(self) -> dict[str, Any]:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state)
