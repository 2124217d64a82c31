"""The student as the engine trains it: a module whose forward is the transformer body (no LM head).

Methods apply the head themselves, fused with the loss and only at answer positions. Running the body
as the forward of a module that Accelerate prepares (DDP, FSDP) matters: wrappers synchronise gradients
through their own forward, so calling `model.base_model` behind their back would silently skip the
all-reduce."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


class LMBody(torch.nn.Module):
    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
    ) -> torch.Tensor:
        out = self.lm.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        hidden: torch.Tensor = out.last_hidden_state
        return hidden
