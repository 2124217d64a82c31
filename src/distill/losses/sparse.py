"""Divergences against a sparse teacher: its top-k next tokens (from a cache or a server) instead of the
full distribution.

The k teacher categories (plus, optionally, one "tail" category holding the mass the top-k leave out)
are treated as a small distribution, the student's full distribution is folded onto the same categories,
and the dense divergences of `tokens.py` run on those (rows, k[+1]) tensors — so every divergence, its
temperature handling and its analytic gradient are written once.

Tail policies:
- `renormalize`: both distributions restricted to the top-k ids and renormalised there. Ignores what
  the teacher puts elsewhere (DistillKit's default for small k).
- `bucket`: one extra category per row: teacher tail = 1 - sum(top-k), student tail = its mass outside
  the top-k ids. Keeps the total mass honest; with k = V it equals the dense loss exactly.

Temperatures. Cached log-probs were normalised at the capture temperature Tc. Up to a per-row constant,
`Tc * logprob` is the teacher's logit, so the loss at temperature T uses `softmax(Tc * logprob / T)` over
the kept categories: exact for `renormalize`. For `bucket` the tail is one category whose logit is
`Tc * log(tail mass)`, i.e. the tail is re-tempered as if it were a single token — an approximation
when T != Tc (the true tail mass at T would need the tail's individual logits, which were not kept).
With T == Tc both policies are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distill.losses.tokens import DivergenceSpec, divergence_value_and_grad

TAIL_POLICIES = ("renormalize", "bucket")


@dataclass(frozen=True)
class SparseTopK:
    """Teacher top-k for N rows: ids (N, k), log-probs (N, k) normalised over the full vocabulary at
    `capture_temperature`."""

    ids: Tensor
    logprobs: Tensor
    capture_temperature: float = 1.0
    tail: str = "bucket"

    def __post_init__(self) -> None:
        if self.tail not in TAIL_POLICIES:
            raise ValueError(f"tail: unknown policy {self.tail!r}; expected one of {TAIL_POLICIES}")
        if self.ids.shape != self.logprobs.shape or self.ids.dim() != 2:
            raise ValueError(
                f"ids and logprobs must both be (N, k), got {tuple(self.ids.shape)} and {tuple(self.logprobs.shape)}"
            )
        if not self.capture_temperature > 0:
            raise ValueError(f"capture_temperature: must be > 0, got {self.capture_temperature!r}")

    def rows(self, start: int, end: int) -> SparseTopK:
        return SparseTopK(self.ids[start:end], self.logprobs[start:end], self.capture_temperature, self.tail)


def _log_tail(logprobs: Tensor) -> Tensor:
    """log(1 - sum(exp(logprobs))) per row, computed in float64 so a tail of 1e-9 survives."""
    mass = 1.0 - logprobs.double().exp().sum(-1, keepdim=True)
    return mass.clamp_min(1e-30).log()


def sparse_value_and_grad(
    student_logits: Tensor, teacher: SparseTopK, spec: DivergenceSpec, grad_scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Per-row divergence between the sparse teacher and the student (N, V) logits, and its gradient
    with respect to the student logits (N, V) times ``grad_scale`` — same conventions (T^2 factor) as
    the dense version; the scale is applied to the (N, k + 1) gradient, before it is spread over V."""
    n, vocab = student_logits.shape
    if teacher.ids.shape[0] != n:
        raise ValueError(f"teacher top-k has {teacher.ids.shape[0]} rows, student logits {n}")
    k = teacher.ids.shape[1]
    if k > vocab or int(teacher.ids.max()) >= vocab or int(teacher.ids.min()) < 0:
        raise ValueError(f"teacher top-k ids must be distinct ids in [0, {vocab})")
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    z = student_logits.to(dtype)
    ids = teacher.ids.long()
    t_cat = teacher.logprobs.to(dtype) * teacher.capture_temperature  # teacher logits up to a row constant
    s_cat = z.gather(1, ids)
    use_tail = teacher.tail == "bucket" and k < vocab
    if use_tail:
        t = spec.temperature
        outside = (z / t).scatter(1, ids, float("-inf"))
        lse_out = torch.logsumexp(
            outside, dim=-1, keepdim=True
        )  # log of the student's tail at T, unnormalised
        s_cat = torch.cat([s_cat, t * lse_out], dim=1)
        t_cat = torch.cat([t_cat, _log_tail(teacher.logprobs).to(dtype) * teacher.capture_temperature], dim=1)
    values, g_cat = divergence_value_and_grad(s_cat, t_cat, spec, grad_scale=grad_scale)
    g_cat = g_cat.to(dtype)
    grad = torch.zeros_like(z)
    if use_tail:
        # d(tail logit)/dz_j = softmax of the tail entries: spread the tail's gradient over them
        weights = (outside - lse_out).exp_()
        grad.add_(weights * g_cat[:, k:])
    grad.scatter_(1, ids, g_cat[:, :k])
    return values.to(dtype), grad
