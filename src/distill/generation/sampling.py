"""The next-token distribution every sampler draws from (teacher answers, student rollouts, drafts and
their verification): one definition of temperature, top-k and top-p, so that a speculative sampler's
draft and target distributions are exactly the ones plain sampling would use.

Temperature 0 means greedy: the distribution is one-hot on the arg-max (ties to the lowest id, as
`torch.argmax` and HF `generate` break them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSpec:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def next_token_probs(logits: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """Probabilities (..., V) in float32 after temperature, top-k and top-p (nucleus) filtering.

    Top-p keeps the smallest set of most likely tokens whose mass reaches `top_p` (the token that crosses
    the threshold is kept), the rule HF's TopPLogitsWarper applies."""
    logits = logits.float()
    if spec.greedy:
        out = torch.zeros_like(logits)
        out.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        return out
    logits = logits / spec.temperature
    if spec.top_k and spec.top_k < logits.shape[-1]:
        kth = logits.topk(spec.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if spec.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the strictly more likely tokens
        drop_sorted = before >= spec.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `probs` (..., V) -> (...)."""
    flat = probs.reshape(-1, probs.shape[-1])
    ids = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
    return ids.reshape(probs.shape[:-1])
