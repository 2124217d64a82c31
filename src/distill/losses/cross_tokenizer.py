"""Losses for distilling a teacher into a student that uses a *different* tokenizer (pure torch functions).

Token-level KL needs a shared vocabulary, so these losses compare what both models can still agree on:

- Approximate likelihood matching (ALM; Minixhofer et al. 2025): text is cut into *chunks*, spans whose
  both ends are token boundaries for both tokenizers, so each chunk has a likelihood under either model
  (:func:`token_logprobs` then :func:`chunk_sums`); :func:`alm_loss` matches those likelihoods.
- Universal Logit Distillation (ULD; Boizard et al. 2024): :func:`uld_loss` compares next-token
  distributions after sorting them, which makes token identities (and so the vocabularies) irrelevant.

Arithmetic runs in float32 at least (float64 stays float64). Nothing detaches the teacher: pass teacher
tensors without grad.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.losses.classifier_logits import as_float as _as_float

__all__ = ["ALM_DIVERGENCES", "alm_loss", "chunk_sums", "token_logprobs", "uld_loss"]

ALM_DIVERGENCES: tuple[str, ...] = ("binary_kl", "binary_reverse_kl", "abs_logp")

# Chunk log-likelihoods are clamped to at most this before the binary divergences: log(1 - p) of a chunk
# with p = 1 is -inf, and its gradient blows up; -1e-6 keeps both finite in float32 too (p <= 0.999999).
_LOGP_CEILING = -1e-6
_LN2 = math.log(2.0)


def _check_temperature(name: str, temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"{name}: temperature must be a finite number > 0, got {temperature!r}")
    return t


def _common_float(*xs: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: half precision loses too much in exp/log."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _in_range(index: Tensor, size: int) -> bool:
    """All of ``index`` in ``[0, size)``. Checked (one host sync) because an out-of-range index on CUDA is
    a device-side assert that poisons the whole process instead of a catchable error."""
    if index.numel() == 0:
        return True
    low, high = torch.aminmax(index)
    return int(low) >= 0 and int(high) < size


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """``(N,)`` log-probabilities ``log_softmax(logits / temperature)[i, targets[i]]`` for ``(N, V)`` logits.

    Written as ``gather - logsumexp`` so that backward keeps no ``(N, V)`` log-softmax alive. Float32 at
    least: these get summed over chunks, where bfloat16 rounding would accumulate.
    """
    t = _check_temperature("token_logprobs", temperature)
    if logits.dim() != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(
            f"token_logprobs: expected (N, V) logits and (N,) targets, got {tuple(logits.shape)}, "
            f"{tuple(targets.shape)}"
        )
    if targets.dtype != torch.int64:
        raise ValueError(f"token_logprobs: targets must be int64, got {targets.dtype}")
    if not _in_range(targets, logits.shape[1]):
        raise ValueError(f"token_logprobs: targets must lie in [0, {logits.shape[1]})")
    x = _as_float(logits) / t
    return x.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(x, dim=1)


def chunk_sums(values: Tensor, chunk_index: Tensor, num_chunks: int) -> Tensor:
    """``(num_chunks,)`` sums of ``values`` ``(N,)`` grouped by ``chunk_index`` ``(N,)``; differentiable.

    Turns per-token log-probs into chunk log-likelihoods (a chunk's tokens multiply, so their logs add).
    A chunk that receives no value sums to 0 (likelihood 1): the caller should only pass chunks that
    hold at least one token on each side. Float32 at least.
    """
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 0:
        raise ValueError(f"chunk_sums: num_chunks must be an int >= 0, got {num_chunks!r}")
    if values.dim() != 1 or chunk_index.shape != values.shape:
        raise ValueError(
            f"chunk_sums: expected (N,) values and (N,) chunk_index, got {tuple(values.shape)}, "
            f"{tuple(chunk_index.shape)}"
        )
    if chunk_index.dtype != torch.int64:
        raise ValueError(f"chunk_sums: chunk_index must be int64, got {chunk_index.dtype}")
    if not _in_range(chunk_index, num_chunks):
        raise ValueError(f"chunk_sums: chunk_index must lie in [0, {num_chunks})")
    v = _as_float(values)
    return torch.zeros(num_chunks, dtype=v.dtype, device=v.device).index_add(0, chunk_index, v)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0`` without cancellation (Maechler 2012): ``expm1`` near 0, ``log1p``
    far from it. Each branch only sees inputs from its own range, so neither can feed inf/NaN into the
    gradient of the other through ``where``."""
    near = x.clamp_min(-_LN2)
    far = x.clamp_max(-_LN2)
    return torch.where(x > -_LN2, torch.log(-torch.expm1(near)), torch.log1p(-torch.exp(far)))


def _binary_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(Bern(p) || Bern(q))`` from log-probabilities (both ``<= _LOGP_CEILING``)."""
    p, one_minus_p = torch.exp(log_p), -torch.expm1(log_p)
    kl = p * (log_p - log_q) + one_minus_p * (_log1mexp(log_p) - _log1mexp(log_q))
    # the two terms cancel to first order near p = q: rounding could leave -1e-17, never a real loss
    return kl.clamp_min(0.0)


def alm_loss(
    student_chunk_logp: Tensor,
    teacher_chunk_logp: Tensor,
    temperature: float = 1.0,
    divergence: str = "binary_kl",
) -> Tensor:
    """Per-chunk approximate-likelihood-matching losses, the shape of the inputs (``(C,)``).

    Inputs are chunk log-likelihoods (``<= 0``; from :func:`chunk_sums`). Both tokenizations cover the
    same text in a chunk, so its likelihood is comparable across models although the tokens are not.
    After the temperature, a chunk likelihood is a Bernoulli probability ("the model produces this
    chunk here"): ``p = exp(teacher / T)``, ``q = exp(student / T)``. ``divergence``:

    - ``binary_kl``: ``KL(Bern(p) || Bern(q))``; both the chunk and its complement count, so a
      student that over-assigns likelihood is penalised as well.
    - ``binary_reverse_kl``: ``KL(Bern(q) || Bern(p))``.
    - ``abs_logp``: ``|teacher / T - student / T|``, a log-space baseline that ignores the complement.

    For the binary divergences both log-likelihoods are first clamped to at most -1e-6 (so a chunk of
    likelihood 1, or a positive value from rounding, gives a finite loss and finite gradients), and
    ``log(1 - p)`` is computed without cancellation: chunks range from ``p`` ~ 1 to ``log p`` ~ -300.
    """
    if student_chunk_logp.shape != teacher_chunk_logp.shape:
        raise ValueError(
            f"alm_loss: student and teacher chunk log-probs must have the same shape, got "
            f"{tuple(student_chunk_logp.shape)}, {tuple(teacher_chunk_logp.shape)}"
        )
    t = _check_temperature("alm_loss", temperature)
    if divergence not in ALM_DIVERGENCES:
        raise ValueError(f"alm_loss: divergence must be one of {ALM_DIVERGENCES}, got {divergence!r}")
    dtype = _common_float(student_chunk_logp, teacher_chunk_logp)
    log_q = student_chunk_logp.to(dtype) / t
    log_p = teacher_chunk_logp.to(dtype) / t
    if divergence == "abs_logp":
        return (log_p - log_q).abs()
    log_p, log_q = log_p.clamp_max(_LOGP_CEILING), log_q.clamp_max(_LOGP_CEILING)
    if divergence == "binary_kl":
        return _binary_kl(log_p, log_q)
    return _binary_kl(log_q, log_p)


def uld_loss(
    student_logits: Tensor,
    teacher_probs_sorted: Tensor,
    teacher_tail: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Per-row Universal Logit Distillation loss ``(N,)``.

    ULD is the Wasserstein-1 distance between the two next-token distributions under a cost that ignores
    token identity; that reduces to the L1 distance between the probability vectors sorted in descending
    order, the shorter one padded with zeros. No vocabulary mapping is needed, at the price of matching
    only the *shape* of the teacher's distribution, not which tokens carry the mass.

    ``student_logits`` ``(N, Vs)``: raw logits, turned into ``softmax(logits / temperature)`` and sorted
    (gradients flow through the sorted values). ``teacher_probs_sorted`` ``(N, K)``: teacher
    probabilities at the same temperature, sorted descending (not checked; the caller prepares them).

    - ``teacher_tail`` None: the full teacher distribution; exact distance over ``max(Vs, K)`` entries.
    - ``teacher_tail`` ``(N,)``: the teacher's top-K and the mass outside it. The first ``m = min(K, Vs)``
      sorted entries are compared exactly and everything after them as one bucket:
      ``|teacher mass after m - student mass after m|`` (for ``K <= Vs`` that is
      ``|tail - (1 - student's top-K mass)|``). By the triangle inequality this is a lower bound of the
      dense distance to any teacher distribution with that top-K and tail, equal to it when the top-K
      covers everything (zero tail).

    Only the student's top ``m`` probabilities are sorted (``topk``), not its whole vocabulary.
    """
    t = _check_temperature("uld_loss", temperature)
    if student_logits.dim() != 2 or teacher_probs_sorted.dim() != 2:
        raise ValueError(
            f"uld_loss: expected (N, Vs) student logits and (N, K) teacher probs, got "
            f"{tuple(student_logits.shape)}, {tuple(teacher_probs_sorted.shape)}"
        )
    n, vs = student_logits.shape
    k = teacher_probs_sorted.shape[1]
    if teacher_probs_sorted.shape[0] != n:
        raise ValueError(f"uld_loss: row counts differ: student {n}, teacher {teacher_probs_sorted.shape[0]}")
    if teacher_tail is not None and teacher_tail.shape != (n,):
        raise ValueError(f"uld_loss: teacher_tail must be ({n},), got {tuple(teacher_tail.shape)}")
    dtype = _common_float(student_logits, teacher_probs_sorted)
    q = torch.softmax(student_logits.to(dtype) / t, dim=1)
    p = teacher_probs_sorted.to(dtype)
    m = min(k, vs)
    q_top = torch.topk(q, m, dim=1, largest=True, sorted=True).values
    # the student's mass after its top m as 1 - top mass: an absolute error of ~1e-7 in float32, but no
    # second (N, Vs) tensor (a masked copy of q) at the peak; the clamp only removes rounding below 0
    q_rest = (1.0 - q_top.sum(dim=1)).clamp_min(0.0) if m < vs else q.new_zeros(n)
    p_rest = p[:, m:].sum(dim=1)
    head = (q_top - p[:, :m]).abs().sum(dim=1)
    if teacher_tail is None:
        # past m only one side is non-zero (the other is zero padding): its entries count in full
        return head + q_rest + p_rest
    return head + (teacher_tail.to(dtype) + p_rest - q_rest).abs()
