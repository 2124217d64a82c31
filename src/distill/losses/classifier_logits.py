"""Logit losses for classifier distillation (pure functions: tensors in, tensors out).

Conventions: logits are ``(B, C)``; arithmetic runs in float32 at least (float64 inputs stay float64);
probabilities are handled in log space (``log_softmax``/``logsumexp``) so that logits of +-1e4 give
finite values and finite gradients. Temperature-scaled divergences are multiplied by ``T**2``
(Hinton et al. 2015, "Distilling the Knowledge in a Neural Network") so the gradient scale does not
depend on ``T``. Nothing here detaches the teacher: pass teacher tensors without grad (or detached).

Per-sample losses return ``(B,)`` so the caller chooses the reduction (mean, sum, per-sample weights);
batch-level losses (DIST) return a scalar *mean* and say so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "as_float",
    "dist_loss",
    "dkd_loss",
    "ensemble_log_probs",
    "kd_loss",
    "kd_loss_from_log_probs",
    "soft_cross_entropy",
    "standardize_logits",
    "standardized_kd_loss",
]


def as_float(x: Tensor) -> Tensor:
    """Half-precision logits lose too much in ``exp``/``log``: compute in float32 (float64 stays)."""
    return x if x.dtype == torch.float64 else x.float()


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")
    return t


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logits: expected two (B, C) tensors of the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )


def _kl_log(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``sum_j p_j (log p_j - log q_j)`` over the last dim, with ``0 log 0 = 0`` for ``log p = -inf``."""
    term = log_p.exp() * (log_p - log_q)
    return torch.where(torch.isneginf(log_p), torch.zeros_like(term), term).sum(dim=-1)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per-sample ``T**2 * KL(softmax(t/T) || softmax(s/T))``, shape ``(B,)``.

    The classic soft-target loss of Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network").
    """
    _check_pair(student_logits, teacher_logits)
    t = _check_temperature(temperature)
    log_q = torch.log_softmax(as_float(student_logits) / t, dim=-1)
    log_p = torch.log_softmax(as_float(teacher_logits) / t, dim=-1)
    return t * t * _kl_log(log_p, log_q)


def kd_loss_from_log_probs(
    student_logits: Tensor, teacher_log_probs_at_t: Tensor, temperature: float
) -> Tensor:
    """Per-sample ``T**2 * KL(p || softmax(s/T))`` where ``log p`` is given (already at temperature ``T``).

    Lets a teacher that is not a single set of logits -- an ensemble (:func:`ensemble_log_probs`), a
    cached distribution -- plug into the same KD loss. ``-inf`` entries of ``log p`` count as zero mass.
    """
    _check_pair(student_logits, teacher_log_probs_at_t)
    t = _check_temperature(temperature)
    log_q = torch.log_softmax(as_float(student_logits) / t, dim=-1)
    return t * t * _kl_log(as_float(teacher_log_probs_at_t), log_q)


def ensemble_log_probs(teacher_logits: Sequence[Tensor], temperature: float) -> Tensor:
    """Log of the average of the members' ``softmax(z/T)``, shape ``(B, C)``.

    MEAL V2 (Shen & Savvides 2020, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on
    ImageNet without Tricks") distils from the averaged teacher *probabilities*; averaging in log space
    with ``logsumexp`` keeps confident members from underflowing.
    """
    if len(teacher_logits) == 0:
        raise ValueError("teacher_logits: need at least one ensemble member")
    t = _check_temperature(temperature)
    shape = teacher_logits[0].shape
    if any(z.shape != shape for z in teacher_logits):
        raise ValueError(
            f"teacher_logits: members differ in shape: {[tuple(z.shape) for z in teacher_logits]}"
        )
    log_ps = torch.stack([torch.log_softmax(as_float(z) / t, dim=-1) for z in teacher_logits])
    return torch.logsumexp(log_ps, dim=0) - math.log(len(teacher_logits))


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Per-sample ``-sum_j q_j log softmax(z)_j``, shape ``(B,)``.

    For targets that are distributions rather than class ids: mixup/CutMix mixed labels (Zhang et al.
    2018; Yun et al. 2019) and label-free KD from stored teacher probabilities. Linear in ``q``, so a
    mixed target gives the mix of the two cross-entropies.
    """
    if logits.shape != target_probs.shape:
        raise ValueError(
            f"shapes differ: logits {tuple(logits.shape)}, target_probs {tuple(target_probs.shape)}"
        )
    log_q = torch.log_softmax(as_float(logits), dim=-1)
    return -(as_float(target_probs) * log_q).sum(dim=-1)


def _per_sample(weight: float | Tensor, like: Tensor) -> float | Tensor:
    """A float stays a float; a tensor must broadcast to ``(B,)`` and takes the loss dtype."""
    if isinstance(weight, Tensor):
        if weight.dim() > 1 or (weight.dim() == 1 and weight.shape[0] not in (1, like.shape[0])):
            raise ValueError(
                f"weight: expected a scalar or shape ({like.shape[0]},), got {tuple(weight.shape)}"
            )
        return weight.to(like.dtype)
    return float(weight)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float | Tensor,
    beta: float | Tensor,
    temperature: float,
) -> Tensor:
    """Per-sample Decoupled KD ``alpha * TCKD + beta * NCKD``, shape ``(B,)``.

    Zhao et al. 2022, "Decoupled Knowledge Distillation": the KD loss splits exactly as
    ``KL = TCKD + (1 - p_t[target]) * NCKD``, where TCKD is the KL between the binary
    (target, not-target) distributions and NCKD the KL among the non-target classes renormalised
    (target excluded). Weighting the two separately (``beta`` free instead of ``1 - p_t``) is DKD's
    point. Both terms are multiplied by ``T**2``. ``alpha``/``beta`` may be floats or per-sample ``(B,)``
    tensors.

    Stability: everything is in log space. The target class is removed by filling its logit with a large
    *finite* negative (``finfo.min / 4``), never ``-inf``, and its (zero-mass) NCKD term is dropped with
    ``torch.where`` -- so logits of +-1e4 give finite values and gradients.
    """
    _check_pair(student_logits, teacher_logits)
    t = _check_temperature(temperature)
    zs, zt = as_float(student_logits) / t, as_float(teacher_logits) / t
    if target.shape != zs.shape[:1]:
        raise ValueError(f"target: expected shape ({zs.shape[0]},), got {tuple(target.shape)}")
    mask = torch.zeros_like(zs, dtype=torch.bool).scatter_(1, target.long().unsqueeze(1), True)
    neg = torch.finfo(zs.dtype).min / 4

    def binary_and_rest(z: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 2) log of (p_target, 1 - p_target), and (B, C) log-probs among non-target classes."""
        z_rest = z.masked_fill(mask, neg)
        lse_all = torch.logsumexp(z, dim=-1, keepdim=True)
        log_target = z.gather(1, target.long().unsqueeze(1)) - lse_all
        log_not_target = torch.logsumexp(z_rest, dim=-1, keepdim=True) - lse_all
        return torch.cat([log_target, log_not_target], dim=1), torch.log_softmax(z_rest, dim=-1)

    bin_s, rest_s = binary_and_rest(zs)
    bin_t, rest_t = binary_and_rest(zt)
    tckd = _kl_log(bin_t, bin_s)
    nckd_terms = rest_t.exp() * (rest_t - rest_s)
    nckd = torch.where(mask, torch.zeros_like(nckd_terms), nckd_terms).sum(dim=-1)
    scale = t * t
    return _per_sample(alpha, tckd) * scale * tckd + _per_sample(beta, nckd) * scale * nckd


def _pearson_rows(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """Pearson correlation of matching rows: cosine of the centred rows, norms clamped at ``eps``."""
    ac = a - a.mean(dim=-1, keepdim=True)
    bc = b - b.mean(dim=-1, keepdim=True)
    denom = ((ac * ac).sum(dim=-1) * (bc * bc).sum(dim=-1)).clamp_min(eps * eps).sqrt()
    return (ac * bc).sum(dim=-1) / denom


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """DIST, a scalar: ``T**2 * (beta * inter + gamma * intra)``, the batch *mean*.

    Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher": exact KL matching is too strict
    when the teacher is much stronger; matching *relations* (Pearson correlation) is enough.
    ``inter`` = mean over samples of ``1 - pearson(p_s[i, :], p_t[i, :])`` (ranking among classes);
    ``intra`` = mean over classes of ``1 - pearson(p_s[:, c], p_t[:, c])`` (ranking among samples).
    The intra term couples the samples of a batch, so this cannot be per-sample: it is already a mean
    over the batch -- multiply by the batch size to combine it with summed per-sample losses. A row or
    column with (near) zero variance has correlation 0 (norms clamped at 1e-8), not NaN.
    """
    _check_pair(student_logits, teacher_logits)
    t = _check_temperature(temperature)
    p_s = torch.softmax(as_float(student_logits) / t, dim=-1)
    p_t = torch.softmax(as_float(teacher_logits) / t, dim=-1)
    eps = 1e-8
    inter = (1.0 - _pearson_rows(p_s, p_t, eps)).mean()
    intra = (1.0 - _pearson_rows(p_s.T, p_t.T, eps)).mean()
    return t * t * (beta * inter + gamma * intra)


def standardize_logits(z: Tensor, eps: float = 1e-7) -> Tensor:
    """Per-sample z-score of logits: ``(z - mean(z)) / (std(z) + eps)`` over the class dim.

    Sun et al. 2024, "Logit Standardization in Knowledge Distillation": a student of smaller capacity
    cannot match the teacher's logit *range*, only its relations; standardising both sides removes
    shift and scale so KD matches the shape alone. ``std`` is the population standard deviation (the
    paper's formula; its code's unbiased std differs by a constant factor that the temperature absorbs).
    A constant row maps to zeros with zero (not NaN) gradient.
    """
    x = as_float(z)
    centred = x - x.mean(dim=-1, keepdim=True)
    var = (centred * centred).mean(dim=-1, keepdim=True)
    std = var.clamp_min(torch.finfo(x.dtype).tiny).sqrt()
    return centred / (std + eps)


def standardized_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per-sample KD on standardised logits (Sun et al. 2024, "Logit Standardization in KD"), ``(B,)``.

    ``kd_loss(standardize_logits(s), standardize_logits(t), T)``: invariant to ``s -> a*s + b`` (a > 0).
    """
    return kd_loss(standardize_logits(student_logits), standardize_logits(teacher_logits), temperature)
