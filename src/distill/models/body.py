"""The one forward of a causal LM's transformer body (no LM head): student training, the live teacher,
the prefix cache's plain path and evaluation all run it, so they cannot drift apart."""

from __future__ import annotations

from typing import Any

import torch


def body_hidden(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
) -> torch.Tensor:
    """Final (normed) hidden states (B, L, H) of `model` (a transformers causal LM)."""
    out = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    hidden: torch.Tensor = out.last_hidden_state
    return hidden


def batch_hidden(model: Any, batch: Any) -> torch.Tensor:
    """`body_hidden` over a token batch (data.batching.Batch)."""
    return body_hidden(model, batch.input_ids, batch.attention_mask, batch.position_ids)
