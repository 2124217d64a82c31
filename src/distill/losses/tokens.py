"""Divergences between teacher and student next-token distributions.

Two implementations of the same maths:

* :func:`divergence_per_token` is the readable reference, differentiated by plain autograd. Tests and
  small inputs use it.
* :func:`divergence_value_and_grad` returns the values *and* the gradient w.r.t. the student logits in
  one pass without autograd. The chunked LM-head loss (``fused_head.py``) uses it, so that only one
  chunk of ``(rows, V)`` logits is ever alive.

Conventions (shared by both): ``p = softmax(teacher / T)``, ``q = softmax(student / T)``, computed in
log space; every value is multiplied by ``T**2`` (Hinton et al. 2015) so that the gradient scale does
not depend on the temperature. Arithmetic is done in float32 at least (float64 inputs stay float64).

Gradients. Every divergence here is ``F(q)`` for a fixed ``p``. With ``g = dF/dq`` (``q`` treated as a
free vector), the chain rule through ``softmax(z / T)`` gives ``dF/dz = (1/T) q * (g - sum(q g))``,
so ``d(T**2 F)/dz = T q * (g - sum(q g))``. Constants added to ``g`` cancel, which is why the ``+1``
from differentiating ``q log q`` is dropped below.

Masked vocabulary entries (teacher logit ``-inf``, so ``p = 0``) give ``0 * log 0 = 0``. Where the
maths itself is infinite -- reverse KL puts ``log p`` under the *student's* mass -- ``log p`` is
floored at ``LOG_PROB_FLOOR`` (a probability of ~2e-35), so a student that puts mass on a forbidden
token pays a large but finite price instead of producing ``inf``/``NaN`` gradients. The same floor
tames models that mask with ``finfo.min`` instead of ``-inf``. It changes nothing measurable for
probabilities above ~1e-30.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")

LOG_PROB_FLOOR = -80.0
"""Lower bound applied to teacher log-probabilities where they appear inside a log-ratio.

``exp(-80)`` is still a normal float32 (the smallest is ~``exp(-87.3)``): a lower floor makes every
masked entry a denormal in the fast path, which on CPUs made ``jsd`` ~2.5x slower with a masked teacher.
"""


@dataclass(frozen=True)
class DivergenceSpec:
    """Which divergence, at which temperature, with which mixing coefficient.

    ``beta`` is used by ``jsd`` only (weight of the teacher in the mixture, TRL/GKD convention);
    ``alpha`` by the skew divergences only (DistiLLM's skew coefficient).
    """

    name: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in DIVERGENCES:
            raise ValueError(f"name: unknown divergence {self.name!r}; expected one of {DIVERGENCES}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature: must be a finite number > 0, got {self.temperature!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta: must be in [0, 1], got {self.beta!r}")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"alpha: must be in [0, 1), got {self.alpha!r}")


def _effective_name(spec: DivergenceSpec) -> str:
    """Resolve the end points that are defined as plain KLs.

    The generalised JSD ``beta KL(p||M) + (1-beta) KL(q||M)`` tends to 0 at both ends of ``beta``
    (``JSD/beta -> KL(p||q)`` as beta -> 0, ``JSD/(1-beta) -> KL(q||p)`` as beta -> 1). Following TRL's
    GKD trainer, ``beta == 0`` exactly *is* forward KL and ``beta == 1`` exactly *is* reverse KL --
    a deliberate discontinuity that lets one knob span both KLs. Skew KLs with ``alpha == 0`` are the
    plain KLs; dispatching them avoids ``0 * inf`` in the ``alpha * q / M`` term.
    """
    name = spec.name
    if name == "jsd" and spec.beta == 0.0:
        return "forward_kl"
    if name == "jsd" and spec.beta == 1.0:
        return "reverse_kl"
    if name == "skew_forward_kl" and spec.alpha == 0.0:
        return "forward_kl"
    if name == "skew_reverse_kl" and spec.alpha == 0.0:
        return "reverse_kl"
    return name


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> torch.dtype:
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 1:
        raise ValueError(
            f"student and teacher logits must have the same (N, V) shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if torch.float64 in (student_logits.dtype, teacher_logits.dtype):
        return torch.float64
    return torch.float32


def _log_softmax(x: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    if temperature == 1.0:
        return torch.log_softmax(x, -1, dtype=dtype)
    return torch.log_softmax(x.to(dtype) / temperature, -1)


def _softmax(x: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    if temperature == 1.0:
        return torch.softmax(x, -1, dtype=dtype)
    e = x.to(dtype, copy=True).div_(temperature)  # one new buffer, then in place
    e = e.sub_(e.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


def _log_softmax_and_softmax(x: Tensor, temperature: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(log_softmax(x / T), softmax(x / T))`` using two new buffers whatever ``T``."""
    if temperature == 1.0:
        return torch.log_softmax(x, -1, dtype=dtype), torch.softmax(x, -1, dtype=dtype)
    log_probs = x.to(dtype, copy=True).div_(temperature)
    log_probs = log_probs.sub_(log_probs.amax(-1, keepdim=True))
    probs = log_probs.exp()
    total = probs.sum(-1, keepdim=True)
    return log_probs.sub_(total.log()), probs.div_(total)


# ----------------------------------------------------------------------------------------------------
# Reference implementation (autograd)
# ----------------------------------------------------------------------------------------------------


def divergence_per_token(student_logits: Tensor, teacher_logits: Tensor, spec: DivergenceSpec) -> Tensor:
    """Per-row divergence ``(N, V), (N, V) -> (N,)``, written for clarity and differentiated by autograd.

    Materialises several ``(N, V)`` tensors; use :func:`divergence_value_and_grad` on large inputs.
    """
    dtype = _check_pair(student_logits, teacher_logits)
    t = spec.temperature
    name = _effective_name(spec)
    log_q = _log_softmax(student_logits, t, dtype)
    log_p_exact = _log_softmax(teacher_logits, t, dtype)
    p = log_p_exact.exp()  # exactly 0 on masked entries
    log_p = log_p_exact.clamp_min(LOG_PROB_FLOOR)  # finite everywhere, so 0 * log p = 0
    q = log_q.exp()

    if name == "forward_kl":
        value = (p * (log_p - log_q)).sum(-1)
    elif name == "reverse_kl":
        value = (q * (log_q - log_p)).sum(-1)
    elif name == "jsd":
        b = spec.beta
        log_m = torch.logaddexp(log_p_exact + math.log(b), log_q + math.log1p(-b))
        value = b * (p * (log_p - log_m)).sum(-1) + (1 - b) * (q * (log_q - log_m)).sum(-1)
    elif name == "skew_forward_kl":
        a = spec.alpha
        log_m = torch.logaddexp(log_p_exact + math.log(a), log_q + math.log1p(-a))
        value = (p * (log_p - log_m)).sum(-1)
    elif name == "skew_reverse_kl":
        a = spec.alpha
        log_m = torch.logaddexp(log_p_exact + math.log1p(-a), log_q + math.log(a))
        value = (q * (log_q - log_m)).sum(-1)
    elif name == "tvd":
        value = 0.5 * (p - q).abs().sum(-1)
    else:  # pragma: no cover - DivergenceSpec validates the name
        raise ValueError(f"name: unknown divergence {name!r}")
    return value * (t * t)


# ----------------------------------------------------------------------------------------------------
# Analytic value + gradient (no autograd)
# ----------------------------------------------------------------------------------------------------
# Each helper receives freshly allocated (rows, V) buffers that it may overwrite, and works in place:
# on large chunks the cost is dominated by how many full-size buffers are allocated and swept, not by
# the arithmetic. Comments say what each buffer holds after each step. ``gs`` is the gradient's overall
# scale: ``T`` from the chain rule times the caller's ``grad_scale``.


def _row_sum(x: Tensor) -> Tensor:
    return x.sum(-1, keepdim=True)


def _softmax_grad_(qg: Tensor, q: Tensor, scale: float) -> Tensor:
    """Turn ``qg = q * g`` into ``scale * q * (g - sum(q g))`` in place."""
    return qg.addcmul_(q, _row_sum(qg), value=-1.0).mul_(scale)


def _log_mixture_(m: Tensor) -> Tensor:
    """``log(m)`` in place. A mixture underflows only where both p and q do; those terms are ~0 anyway."""
    return m.clamp_min_(torch.finfo(m.dtype).tiny).log_()


def _forward_kl(log_q: Tensor, log_p: Tensor, p: Tensor, gs: float) -> tuple[Tensor, Tensor]:
    value = _row_sum(log_p.clamp_min_(LOG_PROB_FLOOR).sub_(log_q).mul_(p))  # p (log p - log q)
    return value, log_q.exp_().sub_(p).mul_(gs)  # T (q - p), times grad_scale


def _reverse_kl(log_q: Tensor, q: Tensor, log_p: Tensor, gs: float) -> tuple[Tensor, Tensor]:
    qg = log_q.sub_(log_p.clamp_min_(LOG_PROB_FLOOR)).mul_(q)  # q (log q - log p)
    value = _row_sum(qg)
    return value, _softmax_grad_(qg, q, gs)


def _jsd(log_q: Tensor, q: Tensor, log_p: Tensor, p: Tensor, gs: float, beta: float) -> tuple[Tensor, Tensor]:
    log_m = _log_mixture_(p.lerp_(q, 1.0 - beta))  # M = beta p + (1 - beta) q
    a = log_p.clamp_min_(LOG_PROB_FLOOR).sub_(log_m)  # log p - log M
    b = log_q.sub_(log_m)  # log q - log M
    kl_pm = _row_sum(log_m.add_(a).exp_().mul_(a))  # exp(log M + a) gives p back without a new buffer
    qb = b.mul_(q)
    kl_qm = _row_sum(qb)
    value = beta * kl_pm + (1.0 - beta) * kl_qm
    return value, _softmax_grad_(qb, q, gs * (1.0 - beta))  # g = (1 - beta)(log q - log M)


def _skew_forward_kl(q: Tensor, log_p: Tensor, p: Tensor, gs: float, alpha: float) -> tuple[Tensor, Tensor]:
    log_m = _log_mixture_(p.lerp_(q, 1.0 - alpha))  # M = alpha p + (1 - alpha) q
    a = log_p.clamp_min_(LOG_PROB_FLOOR).sub_(log_m)  # log p - log M
    value = _row_sum(log_m.add_(a).exp_().mul_(a))  # p (log p - log M)
    qg = a.exp_().mul_(q)  # q p / M, since g = -(1 - alpha) p / M
    return value, _softmax_grad_(qg, q, -gs * (1.0 - alpha))


def _skew_reverse_kl(log_q: Tensor, q: Tensor, p: Tensor, gs: float, alpha: float) -> tuple[Tensor, Tensor]:
    log_m = _log_mixture_(p.lerp_(q, alpha))  # M = (1 - alpha) p + alpha q
    b = log_q.sub_(log_m)  # log q - log M
    value = _row_sum(torch.mul(q, b, out=log_m))
    q_over_m = torch.exp(b, out=log_m)
    qg = b.sub_(q_over_m, alpha=alpha).mul_(q)  # g = log q - log M - alpha q / M
    return value, _softmax_grad_(qg, q, gs)


def _tvd(q: Tensor, p: Tensor, gs: float) -> tuple[Tensor, Tensor]:
    d = p.sub_(q)
    value = 0.5 * torch.linalg.vector_norm(d, 1, -1, keepdim=True)
    qg = d.sign_().neg_().mul_(q)  # g = 0.5 sign(q - p); the 0.5 goes into the scale
    return value, _softmax_grad_(qg, q, 0.5 * gs)


def _owned(x: Tensor, dtype: torch.dtype, reuse: bool) -> bool:
    """Whether ``x``'s own storage may hold the result: handed over, right dtype, contiguous, on CPU.
    ATen's CPU softmax kernels read each element of a contiguous row before writing it, so ``out=x``
    is exact there (tested); a strided view (a padded teacher head sliced to the vocabulary) is not."""
    return reuse and x.dtype == dtype and x.device.type == "cpu" and x.is_contiguous()


def _log_probs(x: Tensor, t: float, dtype: torch.dtype, reuse: bool) -> Tensor:
    """``log_softmax(x / T)``; in ``x``'s storage when handed over (no new buffer)."""
    if not _owned(x, dtype, reuse):
        return _log_softmax(x, t, dtype)
    return torch._log_softmax(x.div_(t) if t != 1.0 else x, -1, False, out=x)


def _probs(x: Tensor, t: float, dtype: torch.dtype, reuse: bool) -> Tensor:
    """``softmax(x / T)``; in ``x``'s storage when handed over."""
    if not _owned(x, dtype, reuse):
        return _softmax(x, t, dtype)
    return torch._softmax(x.div_(t) if t != 1.0 else x, -1, False, out=x)


def _log_probs_and_probs(x: Tensor, t: float, dtype: torch.dtype, reuse: bool) -> tuple[Tensor, Tensor]:
    """``(log_softmax(x / T), softmax(x / T))``: one new buffer when ``x`` is handed over, else two."""
    if not _owned(x, dtype, reuse):
        return _log_softmax_and_softmax(x, t, dtype)
    if t != 1.0:
        x.div_(t)
    probs = torch.softmax(x, -1)
    return torch._log_softmax(x, -1, False, out=x), probs


CPU_BLOCK_ELEMENTS = 1 << 18
"""Row-block size (elements) of :func:`divergence_value_and_grad` on CPU: 1 MiB of float32 per buffer.

Each divergence sweeps its ``(rows, V)`` buffers ~10-20 times; a whole chunk (hundreds of MB) streams
from memory on every sweep, a block of a few rows stays in cache across all of them.
``python benchmarks/divergence_buffers.py`` measures the effect."""


def block_rows(x: Tensor, block_elements: int | None = CPU_BLOCK_ELEMENTS) -> int:
    """Rows per block for row-wise work on ``x`` ``(N, V)``: about ``block_elements`` elements on CPU;
    all rows (one block) elsewhere or when ``block_elements`` is None."""
    if block_elements is None or x.device.type != "cpu":
        return max(1, x.shape[0])
    return max(1, block_elements // x.shape[-1])


@torch.no_grad()
def divergence_value_and_grad(
    student_logits: Tensor,
    teacher_logits: Tensor,
    spec: DivergenceSpec,
    *,
    reuse_student: bool = False,
    reuse_teacher: bool = False,
    grad_scale: float = 1.0,
    block_elements: int | None = CPU_BLOCK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Per-row values ``(N,)`` and ``grad_scale * d(sum of values)/d(student_logits)`` ``(N, V)`` in one pass.

    Same maths as :func:`divergence_per_token`, with the gradient written out by hand so that no
    autograd graph (and none of its saved ``(N, V)`` intermediates) exists. Arithmetic and the returned
    tensors are float32 whatever the input dtype (float64 inputs stay float64, for tests).

    ``reuse_student`` / ``reuse_teacher`` hand that tensor's storage over: it is overwritten (and may be
    the returned gradient), saving one ``(N, V)`` buffer each. On CPU the step cost of a chunk is mostly
    allocating and sweeping such buffers, so this is worth a flag. Only for float32/64 inputs the
    caller will not read again. ``grad_scale`` is folded into the last sweep of the gradient.

    On CPU, rows are processed in blocks of about ``block_elements`` elements (``None``: one block), so
    that all sweeps of a block run in cache; rows are independent, so the result is the same bit for bit.
    """
    _check_pair(student_logits, teacher_logits)
    n, v = student_logits.shape[0], student_logits.shape[-1]
    rows = block_rows(student_logits, block_elements)
    if student_logits.dim() != 2 or rows >= n:
        return _value_and_grad(student_logits, teacher_logits, spec, reuse_student, reuse_teacher, grad_scale)
    # decided for the whole tensor: a one-row block of a strided view looks contiguous
    rz = reuse_student and student_logits.is_contiguous()
    ry = reuse_teacher and teacher_logits.is_contiguous()
    values: list[Tensor] = []
    out: Tensor | None = None
    for start in range(0, n, rows):
        z, y = student_logits[start : start + rows], teacher_logits[start : start + rows]
        value, grad = _value_and_grad(z, y, spec, rz, ry, grad_scale)
        values.append(value)
        if out is None:  # the first block shows where the gradient lives: a handed-over input or new
            if _same_view(grad, z):
                out = student_logits
            elif _same_view(grad, y):
                out = teacher_logits
            else:
                out = torch.empty((n, v), dtype=grad.dtype, device=grad.device)
        target = out[start : start + rows]
        if not _same_view(grad, target):
            target.copy_(grad)
    assert out is not None
    return torch.cat(values), out


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _value_and_grad(
    student_logits: Tensor,
    teacher_logits: Tensor,
    spec: DivergenceSpec,
    rz: bool,
    ry: bool,
    grad_scale: float,
) -> tuple[Tensor, Tensor]:
    dtype = _check_pair(student_logits, teacher_logits)
    z, y, t = student_logits.detach(), teacher_logits.detach(), spec.temperature
    gs = t * grad_scale  # every helper multiplies its gradient by this once (``T`` from the chain rule)
    name = _effective_name(spec)
    if name == "forward_kl":
        value, grad = _forward_kl(_log_probs(z, t, dtype, rz), *_log_probs_and_probs(y, t, dtype, ry), gs)
    elif name == "reverse_kl":
        value, grad = _reverse_kl(*_log_probs_and_probs(z, t, dtype, rz), _log_probs(y, t, dtype, ry), gs)
    elif name == "jsd":
        log_q, q = _log_probs_and_probs(z, t, dtype, rz)
        value, grad = _jsd(log_q, q, *_log_probs_and_probs(y, t, dtype, ry), gs, spec.beta)
    elif name == "skew_forward_kl":
        q = _probs(z, t, dtype, rz)
        value, grad = _skew_forward_kl(q, *_log_probs_and_probs(y, t, dtype, ry), gs, spec.alpha)
    elif name == "skew_reverse_kl":
        log_q, q = _log_probs_and_probs(z, t, dtype, rz)
        value, grad = _skew_reverse_kl(log_q, q, _probs(y, t, dtype, ry), gs, spec.alpha)
    elif name == "tvd":
        value, grad = _tvd(_probs(z, t, dtype, rz), _probs(y, t, dtype, ry), gs)
    else:  # pragma: no cover - DivergenceSpec validates the name
        raise ValueError(f"name: unknown divergence {name!r}")
    return value.squeeze(-1).mul_(t * t), grad
