"""Reuse a frozen teacher's work on the prompt prefix that every row of a batch shares.

Chat data starts every example with the same tokens: the chat template's header and usually a system
prompt (24 of the quickstart's ~100 tokens per example; a few hundred with real system prompts). A
frozen teacher computes exactly the same keys, values and hidden states for that prefix in every row of
every batch. `PrefixCache` runs the prefix once (batch of one), keeps its key/value states and hidden
states (a small LRU keyed by the prefix's token ids), and runs the teacher only on the rest of each
row, attending to the cached prefix: the teacher's forward shrinks by the prefix's share of the tokens.
A batch of two or more rows is split exactly where its rows part, whatever earlier batches cached, so
results never depend on the order batches came in (exact resume); a single row runs the plain forward.

When it applies: right-padded, unpacked batches (packed rows hold several sequences, and only the first
could see the prefix) whose rows all begin with at least `min_tokens` identical real tokens at positions
0, 1, 2, ... Anything else runs the plain forward.

Entries are dropped whenever any of the model's weights is written in place (parameter version
counters), so a teacher that changes (an EMA teacher, a reload) never reads a stale prefix.

Proof before use. Model families differ in how they treat a cache (sliding windows, special caches), so
the first batch it applies to is computed both ways; unless the hidden states agree (relative error
<= `tolerance`) the cache switches itself off for good and the plain forward is used. Later batches are
not re-checked.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from distill.data.batching import Batch
from distill.generation.engine import cache_keyword
from distill.models.body import batch_hidden

_Entry = tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]  # per-layer (K, V); hidden (1, P, H)


def shared_prefix_length(batch: Batch) -> int:
    """Length of the token prefix every row shares, counting only real tokens at positions 0, 1, 2, ..."""
    ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
    if mask is None:  # packed: rows hold several sequences
        return 0
    same = (ids == ids[:1]).all(0) & mask.bool().all(0)
    arange = torch.arange(ids.shape[1], device=ids.device)
    same &= (pos == arange).all(0)
    if bool(same.all()):
        return int(ids.shape[1])
    return int(torch.argmin(same.int()))  # first position where rows differ


class PrefixCache:
    """Hidden states of a frozen causal LM's body, with the batch's shared prefix computed once."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        min_tokens: int = 8,
        capacity: int = 8,
        tolerance: float | None = None,
    ) -> None:
        self.model = model
        self.min_tokens = min_tokens
        self.capacity = capacity
        dtype = next(model.parameters()).dtype
        exact = dtype in (torch.float32, torch.float64)
        self.tolerance = tolerance if tolerance is not None else (1e-4 if exact else 2e-2)
        self.entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self.enabled = True
        self.verified = False
        self.tokens_saved = 0  # row tokens served from cached prefixes (for benchmarks and logs)
        self._weights_version = self._version()

    @property
    def _cache_arg(self) -> str:
        return cache_keyword(self.model.base_model)

    def _version(self) -> int:
        """Sum of the parameters' in-place modification counters: changes whenever any weight is written
        (an optimizer step, an EMA update, a load), so entries never outlive the weights they came from."""
        return sum(p._version for p in self.model.parameters())

    def hidden(self, batch: Batch) -> torch.Tensor:
        """Final (normed) hidden states (B, L, H), equal to `body_hidden(model, batch)`."""
        version = self._version()
        if version != self._weights_version:
            self.entries.clear()
            self._weights_version = version
        shared = shared_prefix_length(batch) if self.enabled else 0
        # keep at least one token to run, so the suffix forward is never empty
        shared = min(shared, batch.input_ids.shape[1] - 1)
        if shared < self.min_tokens:
            return self._plain(batch)
        if batch.input_ids.shape[0] < 2:  # a single row shares nothing with anyone
            return self._plain(batch)
        # split exactly where this batch's rows part: a function of the batch alone, never of which
        # prefixes earlier batches left in the cache, so a resumed run computes bit for bit what an
        # uninterrupted one did (a split point chosen by history changes the last bits of the teacher)
        key = tuple(batch.input_ids[0, :shared].tolist())
        try:
            out = self._with_prefix(batch, key)
        except Exception as err:  # noqa: BLE001 - any model that cannot take a cache: plain forward
            self._disable(f"the teacher's forward does not take a prefix cache ({type(err).__name__}: {err})")
            return self._plain(batch)
        if not self.verified:
            plain = self._plain(batch)
            assert batch.attention_mask is not None  # shared_prefix_length is 0 for packed batches
            real = batch.attention_mask.bool()
            rel = float((out[real] - plain[real]).norm() / plain[real].norm().clamp_min(1e-30))
            if rel > self.tolerance:
                self._disable(
                    f"prefix-cached hidden states differ from the plain forward (relative error {rel:.1e})"
                )
                return plain
            self.verified = True
        return out

    def _disable(self, why: str) -> None:
        self.enabled = False
        self.entries.clear()
        warnings.warn(f"teacher prefix cache off: {why}", RuntimeWarning, stacklevel=3)

    def _plain(self, batch: Batch) -> torch.Tensor:
        return batch_hidden(self.model, batch)

    def _entry(self, key: tuple[int, ...], device: torch.device) -> _Entry:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        out = self.model.base_model(input_ids=torch.tensor([key], device=device), use_cache=True)
        cache: Any = out.get("cache") or out.get("past_key_values")
        entry = ([(layer.keys, layer.values) for layer in cache.layers], out.last_hidden_state)
        self.entries[key] = entry
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return entry

    def _with_prefix(self, batch: Batch, key: tuple[int, ...]) -> torch.Tensor:
        bsz, plen = batch.input_ids.shape[0], len(key)
        kv, prefix_hidden = self._entry(key, batch.input_ids.device)
        cache = DynamicCache(
            ddp_cache_data=[(k.expand(bsz, -1, -1, -1), v.expand(bsz, -1, -1, -1)) for k, v in kv],
            config=self.model.config,
        )
        assert batch.attention_mask is not None
        out = self.model.base_model(
            input_ids=batch.input_ids[:, plen:],
            attention_mask=batch.attention_mask,  # past + current positions
            position_ids=batch.position_ids[:, plen:],
            use_cache=True,
            **{self._cache_arg: cache},
        )
        self.tokens_saved += plen * bsz
        return torch.cat([prefix_hidden.expand(bsz, -1, -1), out.last_hidden_state], dim=1)
