"""Embedding and relation losses for distilling encoders (pure functions, per-sample ``(B,)`` results).

Sentence-embedding and retrieval students are judged by how their embeddings *compare*, not by their
raw coordinates, so besides point-wise regression (MSE, cosine) this module distils the batch's
similarity structure (which needs no projection when the widths differ) and, after MiniLMv2, the
self-attention relations of one layer. Every function returns per-sample losses; the caller sums and
normalises. Arithmetic runs in float32 at least (float64 stays float64). Nothing here detaches the
teacher: pass teacher tensors without grad. Norms are ``sqrt(clamp_min(sum x**2, eps**2))``, so zero
vectors and duplicate rows give finite gradients instead of NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.losses.classifier_logits import as_float as _as_float
from distill.losses.features import _l2_normalize as _unit

__all__ = [
    "cosine_embedding_loss",
    "embedding_mse_loss",
    "relation_kl_loss",
    "similarity_kl_loss",
    "similarity_mse_loss",
]


def _same_shape_pair(s: Tensor, t: Tensor, name: str) -> tuple[Tensor, Tensor]:
    if s.dim() != 2 or s.shape != t.shape:
        raise ValueError(
            f"{name}: expected two (B, D) tensors of the same shape, got {tuple(s.shape)}, {tuple(t.shape)}"
        )
    return _as_float(s), _as_float(t)


def _batch_pair(s: Tensor, t: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Both ``(B, D_s)``, ``(B, D_t)`` with the same ``B >= 2`` (the widths may differ)."""
    if s.dim() != 2 or t.dim() != 2 or s.shape[0] != t.shape[0]:
        raise ValueError(
            f"{name}: expected (B, Ds) and (B, Dt) tensors with the same B, got {tuple(s.shape)}, {tuple(t.shape)}"
        )
    if s.shape[0] < 2:
        raise ValueError(f"{name}: needs a batch of at least 2 embeddings, got {s.shape[0]}")
    return _as_float(s), _as_float(t)


def _off_diagonal_cosines(e: Tensor) -> Tensor:
    """``(B, B-1)``: row ``i`` holds ``cos(e_i, e_j)`` for ``j != i`` in increasing ``j``."""
    u = _unit(e)
    cos = (u @ u.T).clamp(-1.0, 1.0)
    b = cos.shape[0]
    off = ~torch.eye(b, dtype=torch.bool, device=cos.device)
    return cos[off].view(b, b - 1)


def embedding_mse_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Per-sample mean over ``D`` of the squared error, shape ``(B,)``; the embeddings must match in shape.

    Plain regression onto the teacher embedding (project the student first if the widths differ); it
    also transfers the teacher's norms, which the cosine and similarity losses ignore.
    """
    s, t = _same_shape_pair(student, teacher, "embedding_mse")
    diff = s - t
    return (diff * diff).mean(dim=1)


def cosine_embedding_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Per-sample ``1 - cos(s_i, t_i)``, shape ``(B,)``, in ``[0, 2]``; the embeddings must match in shape.

    Direction only: invariant to positive per-row scaling of either side. A zero row counts as
    orthogonal to everything (loss 1). The cosine is clamped to ``[-1, 1]`` so rounding cannot make the
    loss negative.
    """
    s, t = _same_shape_pair(student, teacher, "cosine_embedding")
    cos = (_unit(s) * _unit(t)).sum(dim=1).clamp(-1.0, 1.0)
    return 1.0 - cos


def similarity_kl_loss(student: Tensor, teacher: Tensor, temperature: float = 0.05) -> Tensor:
    """In-batch similarity distillation, per sample ``(B,)``: ``KL(softmax(S_t[i]) || softmax(S_s[i]))``.

    ``S`` is each model's ``(B, B)`` cosine-similarity matrix of the batch rows divided by
    ``temperature``; the diagonal (self-similarity, always 1) is left out of each row's softmax, so row
    ``i`` is a distribution over the other ``B - 1`` samples -- how the teacher ranks the batch as
    neighbours of sample ``i``, the signal a contrastive/retrieval student is trained on. Widths may
    differ. No ``T**2`` factor. Needs ``B >= 2`` (with ``B == 2`` each row has one entry and the loss is 0).
    """
    s, t = _batch_pair(student, teacher, "similarity_kl")
    tau = float(temperature)
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"similarity_kl: temperature must be a finite number > 0, got {temperature!r}")
    log_q = torch.log_softmax(_off_diagonal_cosines(s) / tau, dim=1)
    log_p = torch.log_softmax(_off_diagonal_cosines(t) / tau, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def similarity_mse_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Per sample ``(B,)``: mean over ``j != i`` of ``(cos_s[i, j] - cos_t[i, j])**2``.

    The regression counterpart of :func:`similarity_kl_loss`: matches the cosines themselves rather than
    the neighbour ranking they induce. Widths may differ. Needs ``B >= 2``.
    """
    s, t = _batch_pair(student, teacher, "similarity_mse")
    diff = _off_diagonal_cosines(s) - _off_diagonal_cosines(t)
    return (diff * diff).mean(dim=1)


def _relation_log_probs(x: Tensor, heads: int, keys: Tensor) -> Tensor:
    """``(B, H, T, T)`` log-softmax of ``X_h X_h^T / sqrt(d_h)`` over keys; masked keys get ``-inf``."""
    b, n, d = x.shape
    xh = x.reshape(b, n, heads, d // heads).transpose(1, 2)  # (B, H, T, d_h)
    scores = xh @ xh.transpose(-1, -2) / math.sqrt(d // heads)
    return torch.log_softmax(scores.masked_fill(~keys[:, None, None, :], -math.inf), dim=-1)


def relation_kl_loss(student: Tensor, teacher: Tensor, mask: Tensor, heads: int) -> Tensor:
    """MiniLMv2 self-relation distillation for one layer, per sample ``(B,)``.

    Wang et al. 2021, "MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing
    Pretrained Transformers": split the last dim of ``student`` ``(B, T, Ds)`` and ``teacher``
    ``(B, T, Dt)`` (e.g. one layer's queries, keys or values) into ``heads`` relation heads -- the same
    count for both, so the hidden widths may differ. Per head, ``R = softmax(X_h X_h^T / sqrt(d_h))``
    over the real key positions (``d_h`` is each model's own head width). The loss is
    ``KL(R_teacher[i] || R_student[i])`` summed over real query positions ``i`` and averaged over heads.
    (The paper also averages over positions; divide by ``mask.sum(1)`` to get that.) ``mask`` ``(B, T)``
    marks real tokens (True / nonzero); padded positions' values never affect the result or receive
    gradient. A sample with no real token gets loss 0. Memory: ``O(B * heads * T**2)`` per model.
    """
    if student.dim() != 3 or teacher.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"relation_kl: expected (B, T, Ds) and (B, T, Dt) tensors, got {tuple(student.shape)}, "
            f"{tuple(teacher.shape)}"
        )
    if mask.shape != student.shape[:2]:
        raise ValueError(
            f"relation_kl: mask must be (B, T) = {tuple(student.shape[:2])}, got {tuple(mask.shape)}"
        )
    ds, dt = student.shape[2], teacher.shape[2]
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"relation_kl: heads must be an int >= 1, got {heads!r}")
    if ds % heads or dt % heads:
        raise ValueError(
            f"relation_kl: student width {ds} and teacher width {dt} must both be divisible by heads={heads}"
        )
    real = mask.to(device=student.device, dtype=torch.bool)
    # a sample without real tokens has no real query; letting all its keys count keeps every softmax finite
    keys = real | ~real.any(dim=1, keepdim=True)
    pad = ~real.unsqueeze(-1)
    # masked_fill (not multiplication) so even NaN/inf in padding cannot reach the result
    s = _as_float(student).masked_fill(pad, 0.0)
    t = _as_float(teacher).masked_fill(pad, 0.0)
    log_q, log_p = _relation_log_probs(s, heads, keys), _relation_log_probs(t, heads, keys)
    # masked keys: p = 0 exactly, and log_p - log_q is set to 0 there rather than (-inf) - (-inf)
    hidden = ~keys[:, None, None, :]
    kl = (log_p.exp() * (log_p - log_q).masked_fill(hidden, 0.0)).sum(dim=-1)  # (B, H, T)
    kl = kl.masked_fill(~real[:, None, :], 0.0)  # already 0 (zeroed queries: uniform on both sides); explicit
    return kl.sum(dim=-1).mean(dim=1)
