"""Ranking losses for distilling a relevance scorer (pure functions, per-query ``(B,)`` results).

A reranker is used only to *order* candidates for one query, so what it must learn from a teacher is how
much better one candidate is than another, not an absolute score. Margin-MSE (Hofstätter et al. 2020,
"Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge Distillation") regresses the
student's score margin between the positive and each negative onto the teacher's margin; it is invariant
to a per-query shift of either model's scores, so teacher and student may live on different scales'
offsets (a bi-encoder's cosines, a cross-encoder's logits). The listwise loss is the in-batch
alternative: KL between the teacher's and the student's softmax over one query's candidates (invariant to
the same shift). Arithmetic runs in float32 at least (float64 stays float64); nothing here detaches the
teacher: pass teacher scores without grad.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.losses.classifier_logits import as_float as _as_float

__all__ = ["listwise_kl_loss", "margin_mse_loss"]


def _negatives(neg: Tensor, b: int, name: str) -> Tensor:
    """``(B,)`` -> ``(B, 1)``; ``(B, N)`` as is; anything else is an error."""
    if neg.dim() == 1:
        neg = neg.unsqueeze(1)
    if neg.dim() != 2 or neg.shape[0] != b or neg.shape[1] < 1:
        raise ValueError(
            f"{name}: expected (B,) or (B, N) negative scores with B={b}, got {tuple(neg.shape)}"
        )
    return neg


def margin_mse_loss(
    student_pos: Tensor, student_neg: Tensor, teacher_pos: Tensor, teacher_neg: Tensor
) -> Tensor:
    """Margin-MSE per query, shape ``(B,)``: mean over negatives ``j`` of
    ``((s_pos - s_neg_j) - (t_pos - t_neg_j))**2``.

    ``*_pos``: ``(B,)`` scores of each query's positive; ``*_neg``: ``(B,)`` (one negative per query, the
    paper's triples) or ``(B, N)`` (several; the squared errors are averaged over ``N``). Student and
    teacher negatives must have the same shape. Unchanged when a per-query constant is added to all of a
    model's scores of that query, so only score *differences* are learnt.
    """
    if student_pos.dim() != 1 or teacher_pos.shape != student_pos.shape:
        raise ValueError(
            f"margin_mse: expected (B,) positive scores of the same shape, got {tuple(student_pos.shape)}, "
            f"{tuple(teacher_pos.shape)}"
        )
    b = student_pos.shape[0]
    s_neg, t_neg = _negatives(student_neg, b, "margin_mse"), _negatives(teacher_neg, b, "margin_mse")
    if s_neg.shape != t_neg.shape:
        raise ValueError(
            f"margin_mse: student and teacher negatives differ in shape: {tuple(s_neg.shape)}, {tuple(t_neg.shape)}"
        )
    student_margin = _as_float(student_pos).unsqueeze(1) - _as_float(s_neg)
    teacher_margin = _as_float(teacher_pos).unsqueeze(1) - _as_float(t_neg)
    diff = student_margin - teacher_margin.to(student_margin.dtype)
    return (diff * diff).mean(dim=1)


def listwise_kl_loss(student_scores: Tensor, teacher_scores: Tensor, temperature: float = 1.0) -> Tensor:
    """Listwise distillation per query, shape ``(B,)``: ``KL(softmax(t / T) || softmax(s / T))`` over the
    ``C`` candidates of each row (``(B, C)`` scores, ``C >= 2``; the same candidates in the same order).

    The teacher's softmax says how its probability of "this is the relevant one" spreads over the
    candidates; the student matches the whole list rather than pairs. No ``T**2`` factor. Invariant to a
    per-row shift of either model's scores.
    """
    if student_scores.dim() != 2 or student_scores.shape != teacher_scores.shape:
        raise ValueError(
            f"listwise_kl: expected two (B, C) score tensors of the same shape, got "
            f"{tuple(student_scores.shape)}, {tuple(teacher_scores.shape)}"
        )
    if student_scores.shape[1] < 2:
        raise ValueError(f"listwise_kl: needs at least 2 candidates per query, got {student_scores.shape[1]}")
    tau = float(temperature)
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"listwise_kl: temperature must be a finite number > 0, got {temperature!r}")
    log_q = torch.log_softmax(_as_float(student_scores) / tau, dim=1)
    log_p = torch.log_softmax(_as_float(teacher_scores).to(log_q.dtype) / tau, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)
