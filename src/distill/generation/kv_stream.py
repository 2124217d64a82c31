"""A causal LM decoding with a key/value cache that may hold holes: the bookkeeping speculative decoding
needs to feed a model a few tokens at a time, roll rejected tokens back, and run rows of a batch that
accept different numbers of tokens.

Each cache slot has a validity bit per row. Rolled-back positions at the end of the cache are cut off
(`DynamicCache.crop`); positions that one row rejected while another kept them stay in the cache as
masked slots, and each row's position ids count only its valid slots, so every row sees exactly the
sequence a batch of one would see (up to floating-point order)."""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch
from transformers import PreTrainedModel

from distill.generation.engine import cache_keyword, sync
from distill.generation.growing_cache import growing_cache


class KVStream:
    """One model's cache, per-row slot validity and the tokens each row still has to feed it."""

    def __init__(self, model: PreTrainedModel, batch: int, vocab: int | None = None) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = growing_cache(model.config, reserve=256)
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        self.pending: list[list[int]] = [[] for _ in range(batch)]
        self.vocab = vocab  # logits are cut to this many ids (heads padded past the tokenizer)
        self.calls = 0
        self.seconds = 0.0
        self._cache_kw = cache_keyword(model)
        params = inspect.signature(model.forward).parameters
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else None

    @property
    def slots(self) -> int:
        """Cache length in slots (valid or not)."""
        return int(self.valid.shape[1])

    def cache_length(self) -> int:
        """Length the model's cache itself reports (equals `slots`; kept apart so tests can check it)."""
        return int(self.cache.get_seq_length())

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, new_valid: torch.Tensor, keep: int) -> torch.Tensor:
        """Append `ids` (B, W) to the cache, `new_valid` (B, W) marking real tokens; logits (B, keep, V) of
        the last `keep` positions, float32."""
        start = time.perf_counter()
        base = self.valid.sum(-1, keepdim=True)
        positions = (base + new_valid.long().cumsum(-1) - 1).clamp_min(0)
        self.valid = torch.cat([self.valid, new_valid], dim=1)
        kwargs: dict[str, Any] = {self._cache_kw: self.cache, "use_cache": True, "position_ids": positions}
        if not bool(self.valid.all()):  # holes or padding: the mask says which slots to attend to
            kwargs["attention_mask"] = self.valid.long()
        if self._keep_kw is not None:
            kwargs[self._keep_kw] = keep
        logits = self.model(input_ids=ids, **kwargs).logits[:, -keep:]
        if self.vocab is not None:
            logits = logits[..., : self.vocab]
        sync(self.device)
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return logits.float()

    def feed_pending(self, keep: int, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Forward each row's pending tokens (left-padded with masked dummies to a common width), then
        `extra` (B, E) real tokens; clears `pending`. Returns the last `keep` positions' logits."""
        width = max(len(p) for p in self.pending)
        rows = len(self.pending)
        ids = torch.zeros(rows, width, dtype=torch.long)
        valid = torch.zeros(rows, width, dtype=torch.bool)
        for b, toks in enumerate(self.pending):
            if toks:
                ids[b, width - len(toks) :] = torch.tensor(toks)
                valid[b, width - len(toks) :] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        if extra is not None and extra.shape[1]:
            ids = torch.cat([ids, extra], dim=1)
            valid = torch.cat([valid, torch.ones_like(extra, dtype=torch.bool)], dim=1)
        self.pending = [[] for _ in range(rows)]
        return self.forward(ids, valid, keep)

    def keep_new(self, start: int, keep_per_row: torch.Tensor, first: int) -> None:
        """Roll back the slots appended since slot `start`: the first `first` of them keep their validity,
        then row b keeps `keep_per_row[b]` more; trailing slots no row keeps leave the cache."""
        longest = first + int(keep_per_row.max()) if keep_per_row.numel() else first
        drop = self.slots - (start + longest)
        if drop > 0:
            self.cache.crop(-drop)  # a negative count removes that many (old and new transformers alike)
            self.valid = self.valid[:, : start + longest]
        tail = self.valid[:, start + first :]
        arange = torch.arange(tail.shape[1], device=self.device)
        self.valid[:, start + first :] = tail & (arange[None, :] < keep_per_row.to(self.device)[:, None])

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows (finished rows leave the batch)."""
        self.cache.batch_select_indices(rows.to(self.device))
        self.valid = self.valid[rows.to(self.device)]
        self.pending = [self.pending[int(r)] for r in rows]


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (B, L) and validity (B, L) of prompts left-padded to a common length, so every row's last
    prompt token sits in the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for b, p in enumerate(prompts):
        if p:
            ids[b, width - len(p) :] = torch.tensor(p)
            valid[b, width - len(p) :] = True
    return ids, valid
