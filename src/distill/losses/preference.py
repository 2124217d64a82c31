"""Sequence-level losses on pairs of answers to one prompt: DPO and REDI.

Both compare whole answers, so both start from a sequence's log-probability, the sum of its answer
tokens' log-probabilities. :func:`sequence_logprobs` computes it through the LM head one chunk of
rows at a time, each chunk recomputed in backward (activation checkpointing), so at most one
``(chunk_size, V)`` block of logits is alive at once: a 150k vocabulary times thousands of answer
tokens would not fit otherwise.

* DPO (Rafailov et al. 2023) raises the policy's log-ratio to a frozen reference on the chosen answer
  above that on the rejected one: ``-log sigmoid(beta * margin)``.
* REDI (Xu et al. 2025, "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for
  LLM Reasoning") needs no reference: ``-logp(y+)/|y+| + alpha * logp(y-)/|y-|``. Pushing the
  rejected answer down with a weight ``alpha < 1`` keeps the objective from collapsing both answers
  (the symmetric ``alpha = 1`` is unstable in their experiments).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """log softmax(hidden @ weight.T)[target] per row, the softmax in float32 (float64 stays float64)."""
    mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    cdtype = torch.float64 if mm_dtype == torch.float64 else torch.float32
    logits = (hidden.to(mm_dtype) @ weight.to(mm_dtype).T).to(cdtype)
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    row_of_token: Tensor,
    rows: int,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Per row: the sum of its tokens' log-probabilities, and how many tokens it has.

    ``hidden`` ``(N, H)`` holds the hidden states at the loss positions, ``weight`` ``(V, H)`` the LM
    head, ``targets`` ``(N,)`` the next tokens, ``row_of_token`` ``(N,)`` the row (sequence) each
    position belongs to, in ``[0, rows)``. Differentiable w.r.t. ``hidden`` and ``weight``; a row with
    no tokens gets 0 and a count of 0.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    n = hidden.shape[0]
    if targets.shape != (n,) or row_of_token.shape != (n,):
        raise ValueError(
            f"targets and row_of_token must be ({n},), got {tuple(targets.shape)} and {tuple(row_of_token.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size!r}")
    if n and bool(((targets < 0) | (targets >= weight.shape[0])).any()):
        raise ValueError(f"targets: every target must be in [0, {weight.shape[0]}); select loss rows first")
    if n and bool(((row_of_token < 0) | (row_of_token >= rows)).any()):
        raise ValueError(f"row_of_token: every row must be in [0, {rows})")
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    pieces = []
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, n, chunk_size):
            args = (hidden[start : start + chunk_size], weight, targets[start : start + chunk_size])
            if recompute:
                pieces.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
            else:
                pieces.append(_chunk_logprobs(*args))
    mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    cdtype = torch.float64 if mm_dtype == torch.float64 else torch.float32
    per_token = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=cdtype)
    sums = torch.zeros(rows, dtype=cdtype, device=hidden.device).index_add(0, row_of_token, per_token)
    counts = torch.bincount(row_of_token, minlength=rows)[:rows]
    return sums, counts


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    beta: float,
) -> Tensor:
    """Per pair ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))`` on summed sequence log-probabilities;
    logsigmoid keeps it finite for any margin."""
    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta!r}")
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin)


def redi_loss(
    chosen_logp: Tensor,
    rejected_logp: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
    alpha: float,
    length_normalize: bool = True,
) -> Tensor:
    """Per pair ``-logp(y+)/|y+| + alpha * logp(y-)/|y-|`` (plain sums without length normalisation).
    An empty answer counts as one token, so its (zero) log-probability does not divide by zero."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must be in [0, 1], got {alpha!r}")
    if length_normalize:
        chosen_logp = chosen_logp / chosen_len.clamp(min=1).to(chosen_logp.dtype)
        rejected_logp = rejected_logp / rejected_len.clamp(min=1).to(rejected_logp.dtype)
    return -chosen_logp + alpha * rejected_logp
