"""LM head + token loss, chunked over rows so the full ``(N, V)`` logits never exist.

With a 150k vocabulary, fp32 logits for 8k tokens are ~5 GB, and autograd would keep several such
tensors alive (logits, log-softmaxes, probabilities) until backward. :func:`chunked_head_loss` instead
runs the head, the loss *and its gradient* one chunk of rows at a time inside the forward pass, keeps
only ``d loss / d hidden`` ``(N, H)`` and ``d loss / d weight`` ``(V, H)``, and lets backward merely
scale them. Peak extra memory is a handful of ``(chunk_size, V)`` buffers.

:func:`reference_head_loss` is the naive autograd version with the same signature and semantics: the
oracle for tests and a fallback for tiny problems.

Normalisation is explicit: ``normalizer`` is the number of real tokens in the *whole* accumulated or
global batch, so summing the losses of micro-batches (or processes) gives the big-batch gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from distill.losses.sparse import SparseTopK, sparse_value_and_grad
from distill.losses.tokens import (
    DivergenceSpec,
    block_rows,
    divergence_per_token,
    divergence_value_and_grad,
)

TeacherLogitsFn = Callable[[int, int], Tensor]
"""``fn(start, end)`` returns the teacher logits of rows ``[start, end)``, shape ``(end - start, V_t)``.

A callable rather than a tensor so that teacher logits can be produced (or read from a cache) one
chunk at a time too.
"""

IGNORE_INDEX = -100


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _validate(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor | None,
    has_teacher: bool,
    kd_weight: float,
    ce_weight: float,
    normalizer: float,
    chunk_size: int,
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if not has_teacher and labels is None:
        raise ValueError("teacher_logits/labels: nothing to compute, give at least one")
    if kd_weight != 0 and not has_teacher:
        raise ValueError("teacher_logits: kd_weight is non-zero but no teacher logits were given")
    if ce_weight != 0 and labels is None:
        raise ValueError("labels: ce_weight is non-zero but no labels were given")
    if not normalizer > 0:
        raise ValueError(f"normalizer: must be > 0 (real tokens in the whole batch), got {normalizer!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size!r}")
    if labels is not None:
        if labels.shape != hidden.shape[:1]:
            raise ValueError(f"labels must be (N,) = {tuple(hidden.shape[:1])}, got {tuple(labels.shape)}")
        if labels.numel() and bool(((labels < 0) | (labels >= weight.shape[0])).any()):
            # -100 (ignore) rows must be removed by the caller: they would silently change the normaliser.
            raise ValueError(f"labels: every label must be in [0, {weight.shape[0]}); select loss rows first")


def _teacher_chunk(fn: TeacherLogitsFn, start: int, end: int, vocab: int) -> Tensor:
    """Teacher logits for rows ``[start, end)`` cut to the student's vocabulary.

    Teachers often pad their head to a multiple of 64/128 (Qwen: 151936 vs 152064); the padded tail
    holds no real tokens, so it is dropped. A *smaller* teacher vocabulary cannot be aligned safely.
    """
    logits = fn(start, end).detach()
    if logits.dim() != 2 or logits.shape[0] != end - start:
        raise ValueError(
            f"teacher_logits({start}, {end}) must return ({end - start}, V) logits, got {tuple(logits.shape)}"
        )
    if logits.shape[1] < vocab:
        raise ValueError(
            f"teacher_logits: teacher vocabulary ({logits.shape[1]}) is smaller than the student's ({vocab})"
        )
    return logits[:, :vocab]


def _logsumexp_sum(logits: Tensor) -> Tensor:
    """``sum(logsumexp(logits, -1))``, in cache-sized row blocks on CPU (ATen's logsumexp makes a
    full-size temporary: 0.1 s vs 0.045 s on a quickstart chunk)."""
    step = block_rows(logits)
    total = logits.new_zeros(())
    for start in range(0, logits.shape[0], step):
        total += torch.logsumexp(logits[start : start + step], -1).sum()
    return total


def _cross_entropy_(logits: Tensor, labels: Tensor, scale: float, in_place: bool) -> tuple[Tensor, Tensor]:
    """``sum(log softmax(logits)[label])`` over rows, and ``scale * softmax(logits)`` (the CE gradient
    but for the one-hot), written over ``logits`` when ``in_place`` (nothing else needs them).

    On CPU this runs in cache-sized row blocks with ATen's in-place kernels: a fresh chunk-sized
    log-softmax was ~0.4 s of a quickstart step (page faults, then three sweeps from memory)."""
    if logits.device.type != "cpu" or not logits.is_contiguous():
        log_probs = torch.log_softmax(logits, -1)
        return log_probs.gather(1, labels).sum(), log_probs.exp_().mul_(scale)
    out = logits if in_place else torch.empty_like(logits)
    step = block_rows(logits)
    picked = logits.new_zeros(())
    for start in range(0, logits.shape[0], step):
        block = torch._log_softmax(logits[start : start + step], -1, False, out=out[start : start + step])
        picked += block.gather(1, labels[start : start + step]).sum()
        block.exp_().mul_(scale)
    return picked, out


class _ChunkedHeadLoss(torch.autograd.Function):
    """Loss and its gradients computed together in forward; backward only rescales them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor | None,
        teacher_logits: TeacherLogitsFn | None,
        teacher_topk: SparseTopK | None,
        spec: DivergenceSpec,
        kd_weight: float,
        ce_weight: float,
        normalizer: float,
        chunk_size: int,
        grad_enabled: bool,
        teacher_fresh: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, vocab = hidden.shape[0], weight.shape[0]
        cdtype = _compute_dtype(hidden.dtype, weight.dtype)
        mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        w = weight.detach().to(mm_dtype)
        want_h = grad_enabled and ctx.needs_input_grad[0]
        want_w = grad_enabled and ctx.needs_input_grad[1]
        kd_scale, ce_scale = kd_weight / normalizer, ce_weight / normalizer
        has_teacher = teacher_logits is not None or teacher_topk is not None

        grad_h = torch.empty(hidden.shape, dtype=mm_dtype, device=hidden.device) if want_h else None
        # Accumulate d/d weight over chunks in (at least) fp32 even for bf16 heads: one rounding at the end.
        grad_w = torch.zeros(weight.shape, dtype=cdtype, device=weight.device) if want_w else None
        kd_sum = torch.zeros((), dtype=cdtype, device=hidden.device)
        ce_sum = torch.zeros((), dtype=cdtype, device=hidden.device)

        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end].detach().to(mm_dtype)
            logits = (h @ w.T).to(cdtype)  # this chunk's own buffer: the divergence may overwrite it
            grad: Tensor | None = None
            ce_probs: Tensor | None = None
            if labels is not None:  # before the divergence, which consumes `logits`
                rows = labels[start:end].unsqueeze(1)
                if ce_weight != 0:  # d CE / d z = softmax(z) - onehot(label); the divergence still needs z
                    picked, ce_probs = _cross_entropy_(logits, rows, ce_scale, in_place=not has_teacher)
                    ce_sum -= picked
                else:  # the value only: no (rows, V) buffer survives
                    ce_sum -= logits.gather(1, rows).sum() - _logsumexp_sum(logits)
            if has_teacher:
                if teacher_logits is not None:
                    values, kd_grad = divergence_value_and_grad(
                        logits,
                        _teacher_chunk(teacher_logits, start, end, vocab),
                        spec,
                        reuse_student=True,
                        reuse_teacher=teacher_fresh,
                        grad_scale=kd_scale,
                    )
                else:
                    assert teacher_topk is not None
                    values, kd_grad = sparse_value_and_grad(
                        logits, teacher_topk.rows(start, end), spec, grad_scale=kd_scale
                    )
                kd_sum += values.sum()
                if kd_weight != 0:
                    grad = kd_grad  # already scaled by kd_scale
                del kd_grad
            del logits
            if ce_probs is not None:
                assert labels is not None
                rows = labels[start:end].unsqueeze(1)
                grad = ce_probs if grad is None else grad.add_(ce_probs)  # both already scaled
                grad.scatter_add_(1, rows, grad.new_full(rows.shape, -ce_scale))
                del ce_probs
            if grad is None:  # both weights zero: the loss is a constant of this chunk
                if grad_h is not None:
                    grad_h[start:end].zero_()
                continue
            g = grad.to(mm_dtype)
            if grad_h is not None:
                torch.mm(g, w, out=grad_h[start:end])
            if grad_w is not None:
                if g.dtype == cdtype:
                    grad_w.addmm_(g.T, h)
                else:
                    grad_w += g.T @ h
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        loss = (kd_weight * kd_sum + ce_weight * ce_sum) / normalizer
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return loss, kd_sum, ce_sum

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        dh = None if grad_h is None else (grad_h * grad_loss).to(h_dtype)
        dw = None if grad_w is None else (grad_w * grad_loss).to(w_dtype)
        return dh, dw, None, None, None, None, None, None, None, None, None, None


def chunked_head_loss(
    hidden: Tensor,
    weight: Tensor,
    *,
    labels: Tensor | None = None,
    teacher_logits: TeacherLogitsFn | None = None,
    teacher_topk: SparseTopK | None = None,
    spec: DivergenceSpec | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    normalizer: float,
    chunk_size: int = 1024,
    teacher_logits_fresh: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(kd_weight * sum D + ce_weight * sum CE) / normalizer`` through the LM head, chunk by chunk.

    The teacher is either dense (``teacher_logits``) or sparse (``teacher_topk``: top-k log-probs from a
    cache or a server, see ``sparse.py``), never both.

    ``hidden`` ``(N, H)`` holds the student's final hidden states at the loss positions only (no
    ignore rows); ``weight`` ``(V, H)`` is its LM head (tied or frozen is fine). ``D`` is the divergence
    chosen by ``spec`` (temperature-scaled, times ``T**2``); ``CE`` is cross-entropy at temperature 1.
    Returns the scalar loss (differentiable w.r.t. ``hidden`` and ``weight``) and the detached parts
    ``{"kd": sum D / normalizer, "ce": sum CE / normalizer}`` for the terms that were given inputs.
    Logits are computed in the inputs' dtype and upcast to float32 (float64 stays float64).
    ``teacher_logits_fresh``: ``teacher_logits`` returns a new tensor on every call, which may then be
    overwritten (one (chunk, V) buffer less; see ``TeacherSignal.fresh``).
    """
    spec = spec if spec is not None else DivergenceSpec()
    normalizer = float(normalizer)
    if teacher_logits is not None and teacher_topk is not None:
        raise ValueError("teacher_logits/teacher_topk: give a dense or a sparse teacher, not both")
    if teacher_topk is not None and teacher_topk.ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"teacher_topk: {teacher_topk.ids.shape[0]} rows for {hidden.shape[0]} hidden rows")
    has_teacher = teacher_logits is not None or teacher_topk is not None
    _validate(hidden, weight, labels, has_teacher, kd_weight, ce_weight, normalizer, chunk_size)
    with torch.autocast(hidden.device.type, enabled=False):
        loss, kd_sum, ce_sum = _ChunkedHeadLoss.apply(
            hidden,
            weight,
            labels,
            teacher_logits,
            teacher_topk,
            spec,
            kd_weight,
            ce_weight,
            normalizer,
            chunk_size,
            torch.is_grad_enabled(),
            teacher_logits_fresh,
        )
    parts = {}
    if has_teacher:
        parts["kd"] = kd_sum / normalizer
    if labels is not None:
        parts["ce"] = ce_sum / normalizer
    return loss, parts


def reference_head_loss(
    hidden: Tensor,
    weight: Tensor,
    *,
    labels: Tensor | None = None,
    teacher_logits: TeacherLogitsFn | None = None,
    spec: DivergenceSpec | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    normalizer: float,
    chunk_size: int = 1024,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Same contract as :func:`chunked_head_loss`, computed naively with autograd on full logits.

    ``chunk_size`` is accepted for signature parity and ignored.
    """
    spec = spec if spec is not None else DivergenceSpec()
    normalizer = float(normalizer)
    _validate(
        hidden, weight, labels, teacher_logits is not None, kd_weight, ce_weight, normalizer, chunk_size
    )
    cdtype = _compute_dtype(hidden.dtype, weight.dtype)
    mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    logits = (hidden.to(mm_dtype) @ weight.to(mm_dtype).T).to(cdtype)
    loss = logits.new_zeros(())
    parts: dict[str, Tensor] = {}
    if teacher_logits is not None:
        teacher = _teacher_chunk(teacher_logits, 0, hidden.shape[0], weight.shape[0])
        kd = divergence_per_token(logits, teacher, spec).sum()
        loss = loss + kd_weight * kd
        parts["kd"] = kd.detach() / normalizer
    if labels is not None:
        ce = F.cross_entropy(logits, labels, reduction="sum")
        loss = loss + ce_weight * ce
        parts["ce"] = ce.detach() / normalizer
    return loss / normalizer, parts
