"""A K/V cache whose layers write new keys/values into spare room instead of concatenating.

transformers' `DynamicLayer` appends with `torch.cat`, which copies the whole cache of every layer at
every decode step: for SmolLM2-135M at batch 64 and ~100 cached tokens that is ~0.3 GB of copies per
step, 15 % of a CPU decode step in the torch profiler (docs/on_policy.md). A `GrowingLayer` keeps
a buffer with room to spare (doubling when full) and hands attention a view of its filled part, so a step
copies only its new token. Rollback (`crop`) is a shorter view; row selection and expansion copy once and
the next write regrows the room. Layers of other kinds (sliding windows) are left as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose `keys`/`values` are views into buffers with room for later tokens."""

    def __init__(self, reserve: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reserve = reserve  # room made at the first write, beyond what it needs
        self._key_buf: torch.Tensor | None = None
        self._value_buf: torch.Tensor | None = None

    def _filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys, self.values
        assert keys is not None and values is not None
        return keys, values

    def _backed(self) -> bool:
        """Whether `keys`/`values` are still the front of the buffers (not replaced by a selection)."""
        keys, values = self._filled()
        kb, vb = self._key_buf, self._value_buf
        return (
            kb is not None
            and vb is not None
            and keys.data_ptr() == kb.data_ptr()
            and values.data_ptr() == vb.data_ptr()
            and keys.shape[:2] == kb.shape[:2]
            and keys.stride() == kb.stride()
        )

    def _regrow(self, need: int) -> None:
        keys, values = self._filled()
        length = keys.shape[-2]
        room = max(need + self.reserve, 2 * length)
        kb = keys.new_empty((*keys.shape[:2], room, keys.shape[-1]))
        vb = values.new_empty((*values.shape[:2], room, values.shape[-1]))
        kb[:, :, :length] = keys
        vb[:, :, :length] = values
        self._key_buf, self._value_buf = kb, vb

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
            self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        length, new = self._filled()[0].shape[-2], key_states.shape[-2]
        if not self._backed() or self._key_buf is None or length + new > self._key_buf.shape[-2]:
            self._regrow(length + new)
        kb, vb = self._key_buf, self._value_buf
        assert kb is not None and vb is not None
        kb[:, :, length : length + new] = key_states
        vb[:, :, length : length + new] = value_states
        self.keys, self.values = kb[:, :, : length + new], vb[:, :, : length + new]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buf = self._value_buf = None
        super().reset()


def growing_cache(config: Any, reserve: int = 0) -> DynamicCache:
    """A `DynamicCache` for `config` whose full-attention layers are `GrowingLayer`s with `reserve` tokens
    of room beyond the first write (e.g. the new tokens a generation will add)."""
    cache = DynamicCache(config=config)
    cache.layers = [
        GrowingLayer(reserve=reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache
