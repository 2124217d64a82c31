"""Representation losses for distilling causal language models (pure functions, torch only).

Two families: hidden-state matching (Minitron-style: one student row against one teacher row, after the
caller projected the student to the teacher's width) and MiniLM / MiniLMv2 relation distillation,
which compares ``softmax(L R^T / sqrt(d))`` distributions and therefore needs no projection at all.
Relations here respect causal decoders (query ``i`` sees keys ``j <= i``), padding on either side and a
``query_mask`` choosing which rows count (e.g. answer tokens only); :func:`expand_kv` lines up
grouped-query keys/values with the queries. Arithmetic runs in float32 at least (float64 stays
float64). Nothing here detaches the teacher: pass teacher tensors without grad.

The relation tensors are ``(B, heads, T, T)`` per model, far larger than the ``(B, T, D)`` inputs, so
summing several layers' terms keeps every layer's relations alive until backward.
:func:`relation_kl_checkpointed` recomputes them during backward instead, which keeps the peak at about
one layer's relations whatever the number of distilled layers.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from distill.losses.classifier_logits import as_float as _as_float
from distill.losses.embedding import cosine_embedding_loss, embedding_mse_loss
from distill.losses.features import _safe_norm

__all__ = [
    "HIDDEN_LOSSES",
    "HiddenLoss",
    "expand_kv",
    "hidden_state_loss",
    "relation_kl",
    "relation_kl_checkpointed",
]

HiddenLoss = Literal["mse", "cosine", "normalized_mse"]
HIDDEN_LOSSES: tuple[HiddenLoss, ...] = get_args(HiddenLoss)

_RMS_FLOOR = 1e-6  # teacher rows with a smaller RMS are treated as having this RMS (no division by 0)


# ----------------------------------------------------------------------------------------------------
# Hidden states
# ----------------------------------------------------------------------------------------------------


def hidden_state_loss(student: Tensor, teacher: Tensor, kind: HiddenLoss) -> Tensor:
    """Per-row loss ``(N,)`` between student rows ``(N, D)`` and teacher rows ``(N, D)``.

    The student must already be projected to the teacher's width (that projection is trained, so it
    belongs to the caller). ``kind``:

    - ``mse``: mean over channels of ``(s - t)**2``; transfers the teacher's magnitudes too.
    - ``cosine``: ``1 - cos(s, t)`` in ``[0, 2]``; direction only, blind to either row's scale.
    - ``normalized_mse``: ``mse`` after dividing *both* rows by the teacher row's RMS
      (``sqrt(mean t**2)``), i.e. the squared error relative to the teacher's energy. Unlike
      ``cosine`` the student must still match the teacher's norm, but the loss no longer depends on how
      large the teacher's activations are (LLM hidden states grow by orders of magnitude with depth and
      have outlier channels), so layers can be summed with equal weights. Equals ``mse`` where the
      teacher row has unit RMS, and 1 for a zero student. Teacher RMS below 1e-6 counts as 1e-6.
    """
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"hidden_state_loss: expected two (N, D) tensors of the same shape, got {tuple(student.shape)}, "
            f"{tuple(teacher.shape)}"
        )
    if kind == "mse":
        return embedding_mse_loss(student, teacher)
    if kind == "cosine":
        return cosine_embedding_loss(student, teacher)
    if kind == "normalized_mse":
        s, t = _as_float(student), _as_float(teacher)
        rms = (_safe_norm(t) / math.sqrt(t.shape[1])).clamp_min(_RMS_FLOOR)
        diff = (s - t) / rms.unsqueeze(1)
        return (diff * diff).mean(dim=1)
    raise ValueError(f"hidden_state_loss: kind must be one of {HIDDEN_LOSSES}, got {kind!r}")


# ----------------------------------------------------------------------------------------------------
# Grouped-query attention
# ----------------------------------------------------------------------------------------------------


def expand_kv(x: Tensor, num_heads: int, num_kv_heads: int) -> Tensor:
    """``(B, T, num_kv_heads * d)`` -> ``(B, T, num_heads * d)``: each key/value head repeated for the
    ``num_heads // num_kv_heads`` consecutive query heads that share it (the Hugging Face ``repeat_kv``
    layout), so that queries and keys have the same width and relation heads line up with them.
    A copy (the relations need contiguous heads); ``num_heads == num_kv_heads`` returns ``x`` itself.
    """
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"expand_kv: {name} must be an int >= 1, got {value!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"expand_kv: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if x.dim() != 3 or x.shape[2] % num_kv_heads:
        raise ValueError(
            f"expand_kv: expected (B, T, num_kv_heads * d) with num_kv_heads={num_kv_heads}, got {tuple(x.shape)}"
        )
    if num_heads == num_kv_heads:
        return x
    b, n, width = x.shape
    d = width // num_kv_heads
    rep = num_heads // num_kv_heads
    return x.view(b, n, num_kv_heads, 1, d).expand(b, n, num_kv_heads, rep, d).reshape(b, n, num_heads * d)


# ----------------------------------------------------------------------------------------------------
# MiniLM / MiniLMv2 relations
# ----------------------------------------------------------------------------------------------------


def _check_relation_args(
    name: str,
    s_left: Tensor,
    s_right: Tensor,
    t_left: Tensor,
    t_right: Tensor,
    key_mask: Tensor,
    query_mask: Tensor,
    heads: int,
) -> None:
    pairs = (("student", s_left, s_right), ("teacher", t_left, t_right))
    for side, left, right in pairs:
        if left.dim() != 3 or left.shape != right.shape:
            raise ValueError(
                f"{name}: {side} left and right must be (B, T, D) of the same shape, got "
                f"{tuple(left.shape)}, {tuple(right.shape)}"
            )
        if not (left.is_floating_point() and right.is_floating_point()):
            raise ValueError(
                f"{name}: {side} tensors must be floating point, got {left.dtype}, {right.dtype}"
            )
    if s_left.shape[:2] != t_left.shape[:2]:
        raise ValueError(
            f"{name}: student and teacher must share (B, T), got {tuple(s_left.shape)}, {tuple(t_left.shape)}"
        )
    bt = tuple(s_left.shape[:2])
    for mask_name, mask in (("key_mask", key_mask), ("query_mask", query_mask)):
        if tuple(mask.shape) != bt:
            raise ValueError(f"{name}: {mask_name} must be (B, T) = {bt}, got {tuple(mask.shape)}")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"{name}: heads must be an int >= 1, got {heads!r}")
    ds, dt = s_left.shape[2], t_left.shape[2]
    if ds % heads or dt % heads:
        raise ValueError(
            f"{name}: student width {ds} and teacher width {dt} must both be divisible by heads={heads}"
        )


def _relation_log_probs(left: Tensor, right: Tensor, heads: int, allowed: Tensor) -> Tensor:
    """``(B, H, T, T)`` log-softmax over keys of ``L_h R_h^T / sqrt(d_h)``; disallowed keys get ``-inf``."""
    b, n, d = left.shape
    dh = d // heads
    lh = left.reshape(b, n, heads, dh).transpose(1, 2)  # (B, H, T, d_h)
    rh = right.reshape(b, n, heads, dh).transpose(1, 2)
    scores = (lh @ rh.transpose(-1, -2)) / math.sqrt(dh)
    return torch.log_softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)


def _relation_kl(
    s_left: Tensor,
    s_right: Tensor,
    t_left: Tensor,
    t_right: Tensor,
    key_mask: Tensor,
    query_mask: Tensor,
    heads: int,
    causal: bool,
    self_student: bool,
    self_teacher: bool,
) -> Tensor:
    """The unchecked computation shared by both public functions (inputs validated, masks bool).

    ``self_*``: right is left (decided by the caller: under checkpointing the recomputation may see
    other tensor objects), so it is masked and upcast once."""
    n = key_mask.shape[1]
    allowed = key_mask[:, None, None, :]  # (B, 1, 1, T)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=key_mask.device).tril()
    else:
        allowed = allowed.expand(-1, -1, n, -1)
    # a row without any visible key (a padded position before the first real token, or a sample with no
    # real token) would softmax over nothing: let it see every key so it stays finite; it never counts
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    # masked_fill (not multiplication): NaN/inf at padded positions can reach neither value nor gradient
    pad = ~key_mask.unsqueeze(-1)
    s_l, t_l = (_as_float(x).masked_fill(pad, 0.0) for x in (s_left, t_left))
    s_r = s_l if self_student else _as_float(s_right).masked_fill(pad, 0.0)
    t_r = t_l if self_teacher else _as_float(t_right).masked_fill(pad, 0.0)
    log_q = _relation_log_probs(s_l, s_r, heads, allowed)
    log_p = _relation_log_probs(t_l, t_r, heads, allowed)
    # disallowed keys: p = 0 exactly, and their term is set to 0 rather than (-inf) - (-inf)
    kl = (log_p.exp() * (log_p - log_q).masked_fill(~allowed, 0.0)).sum(dim=-1)  # (B, H, T)
    counted = query_mask & key_mask  # a padded position is never a query
    return kl.masked_fill(~counted[:, None, :], 0.0).sum() / heads


def _bool_masks(key_mask: Tensor, query_mask: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    return key_mask.to(device=device, dtype=torch.bool), query_mask.to(device=device, dtype=torch.bool)


def relation_kl(
    s_left: Tensor,
    s_right: Tensor,
    t_left: Tensor,
    t_right: Tensor,
    key_mask: Tensor,
    query_mask: Tensor,
    heads: int,
    *,
    causal: bool = True,
    checkpointed: bool = False,
) -> Tensor:
    """Sum over selected query rows of ``KL(teacher relation row || student relation row)``, averaged over
    relation heads; a 0-dim tensor (the caller divides by its own normaliser, e.g. the answer tokens).

    Per model, ``left`` and ``right`` ``(B, T, D)`` are split into ``heads`` relation heads of width
    ``D / heads`` (each model its own ``D``: the widths may differ, the head count is shared) and
    ``R_h = softmax(L_h R_h^T / sqrt(d_h))`` over the keys ``j`` that are real (``key_mask``) and, when
    ``causal``, ``j <= i``. MiniLMv2 self-relations (query-query, key-key, value-value; Wang et al.
    2021) pass the same tensor as left and right; the MiniLM attention distribution (Wang et al. 2020)
    passes queries as left and keys as right (through :func:`expand_kv` under grouped-query attention,
    with ``heads`` = the attention heads to reproduce the model's own attention).

    ``key_mask`` ``(B, T)`` marks real tokens; padded positions never affect the result nor receive
    gradient, even if they hold NaN/inf. ``query_mask`` ``(B, T)`` selects the rows that count; a padded
    position never counts. Memory: several ``(B, heads, T, T)`` tensors per model are kept for backward;
    see :func:`relation_kl_checkpointed`.
    """
    name = "relation_kl_checkpointed" if checkpointed else "relation_kl"
    _check_relation_args(name, s_left, s_right, t_left, t_right, key_mask, query_mask, heads)
    keys, queries = _bool_masks(key_mask, query_mask, s_left.device)
    same = (s_right is s_left, t_right is t_left)  # decided here: recomputation sees other tensor objects
    if not checkpointed:
        return _relation_kl(s_left, s_right, t_left, t_right, keys, queries, heads, bool(causal), *same)
    out = checkpoint(
        _relation_kl, s_left, s_right, t_left, t_right, keys, queries, heads, bool(causal), *same,
        use_reentrant=False,
        preserve_rng_state=False,  # nothing random inside
    )  # fmt: skip
    assert isinstance(out, Tensor)
    return out


def relation_kl_checkpointed(*args: Any, **kwargs: Any) -> Tensor:
    """:func:`relation_kl` (same value, same gradient) under activation checkpointing.

    Only the inputs are kept for backward, which recomputes the ``(B, heads, T, T)`` relations one term
    at a time: summing many layers' terms then costs about one layer's relation memory at the peak,
    instead of one per layer, for a second forward pass of the relations (cheap next to the models).
    """
    return relation_kl(*args, checkpointed=True, **kwargs)
