"""Cross-tokenizer losses (ALM, ULD): naive float64 references (explicit loops), numerics, properties."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses.cross_tokenizer import (
    ALM_DIVERGENCES,
    alm_loss,
    chunk_sums,
    token_logprobs,
    uld_loss,
)

PROPS = settings(max_examples=25, deadline=None)
F64 = torch.float64
SEEDS = st.integers(0, 2**31 - 1)
TEMPERATURES = st.sampled_from([0.5, 1.0, 2.0, 7.0])
CEILING = -1e-6  # the module's clamp for the binary divergences, restated


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(x - top) for x in row]
    return [x / sum(e) for x in e]


def _sorted_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=1).sort(dim=1, descending=True).values


# ----------------------------------------------------------------------------------------------------
# Naive references
# ----------------------------------------------------------------------------------------------------


def naive_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> list[float]:
    out = []
    for row, target in zip(logits.tolist(), targets.tolist(), strict=True):
        xs = [x / temperature for x in row]
        top = max(xs)
        out.append(xs[target] - (top + math.log(sum(math.exp(x - top) for x in xs))))
    return out


def naive_chunk_sums(values: torch.Tensor, index: torch.Tensor, num_chunks: int) -> list[float]:
    out = [0.0] * num_chunks
    for v, c in zip(values.tolist(), index.tolist(), strict=True):
        out[c] += v
    return out


def _bernoulli_kl(a: float, b: float) -> float:
    """KL(Bern(exp a) || Bern(exp b)); ``1 - exp(x)`` as ``-expm1(x)``, the textbook way to keep it."""
    p = math.exp(a)  # p * log(p / q) written as p * (a - b): q may underflow where p does not
    return p * (a - b) + -math.expm1(a) * math.log(math.expm1(a) / math.expm1(b))


def naive_alm(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, divergence: str
) -> list[float]:
    out = []
    for s, t in zip(student.tolist(), teacher.tolist(), strict=True):
        a, b = t / temperature, s / temperature
        if divergence == "abs_logp":
            out.append(abs(a - b))
            continue
        a, b = min(a, CEILING), min(b, CEILING)
        out.append(_bernoulli_kl(a, b) if divergence == "binary_kl" else _bernoulli_kl(b, a))
    return out


def naive_uld(
    logits: torch.Tensor, teacher: torch.Tensor, tail: torch.Tensor | None, temperature: float
) -> list[float]:
    out = []
    tails = [None] * len(teacher) if tail is None else tail.tolist()
    for row, p, rest in zip(logits.tolist(), teacher.tolist(), tails, strict=True):
        q = sorted(_softmax([x / temperature for x in row]), reverse=True)
        if rest is None:  # dense: zero padding to the longer length
            width = max(len(p), len(q))
            q_pad, p_pad = q + [0.0] * (width - len(q)), p + [0.0] * (width - len(p))
            out.append(sum(abs(x - y) for x, y in zip(q_pad, p_pad, strict=True)))
        else:
            m = min(len(p), len(q))
            head = sum(abs(q[i] - p[i]) for i in range(m))
            out.append(head + abs(rest + sum(p[m:]) - (1 - sum(q[:m]))))
    return out


def _close(got: torch.Tensor, want: list[float], tol: float = 1e-10) -> None:
    assert got.dtype == F64 and got.shape == (len(want),)
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), atol=tol, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Golden tests
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_token_logprobs_golden(temperature: float) -> None:
    logits = _randn(6, 9, seed=1, scale=4.0)
    targets = torch.tensor([0, 8, 3, 3, 5, 1])
    _close(token_logprobs(logits, targets, temperature), naive_token_logprobs(logits, targets, temperature))


def test_chunk_sums_golden_and_gradient() -> None:
    values = _randn(7, seed=2).requires_grad_(True)
    index = torch.tensor([0, 0, 2, 2, 2, 4, 0])  # chunks 1 and 3 are empty: they sum to 0
    got = chunk_sums(values, index, 5)
    _close(got, naive_chunk_sums(values, index, 5), tol=1e-14)
    (grad,) = torch.autograd.grad((got * torch.arange(5, dtype=F64)).sum(), [values])
    assert grad.tolist() == [float(c) for c in index.tolist()]
    assert chunk_sums(values[:0], index[:0], 3).tolist() == [0.0, 0.0, 0.0]


# teacher / student chunk log-likelihoods: exactly 0, just below 0, a positive rounding error, moderate,
# and very unlikely chunks
ALM_TEACHER = [0.0, -1e-9, -1e-6, -1e-3, -0.5, -3.0, -30.0, -200.0, -0.7, -5.0, -2.0]
ALM_STUDENT = [-0.2, 0.0, -2e-6, -1e-3, -4.0, -0.1, -25.0, -180.0, -0.69, 1e-8, -2.0]


@pytest.mark.parametrize("divergence", ALM_DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_alm_loss_golden(divergence: str, temperature: float) -> None:
    s, t = torch.tensor(ALM_STUDENT, dtype=F64), torch.tensor(ALM_TEACHER, dtype=F64)
    got = alm_loss(s, t, temperature, divergence)
    _close(got, naive_alm(s, t, temperature, divergence))
    assert got[-1] == 0  # equal chunks


@pytest.mark.parametrize("divergence", ALM_DIVERGENCES)
def test_alm_loss_float32_stays_accurate_near_likelihood_one(divergence: str) -> None:
    """``log(1 - p)`` for ``p`` ~ 1 computed as ``log1p(-exp(x))`` is off by ~1e-2 in float32 (``exp``
    rounds to a multiple of 6e-8 near 1); the float32 loss must track the float64 reference."""
    s, t = torch.tensor(ALM_STUDENT), torch.tensor(ALM_TEACHER)
    got = alm_loss(s, t, 1.0, divergence)
    want = torch.tensor(naive_alm(s.double(), t.double(), 1.0, divergence), dtype=F64)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


ULD_SHAPES = [(7, 7), (9, 5), (4, 8)]  # (student vocabulary, teacher K)


@pytest.mark.parametrize(("vs", "k"), ULD_SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
def test_uld_loss_golden_dense(vs: int, k: int, temperature: float) -> None:
    logits = _randn(5, vs, seed=3, scale=2.0)
    teacher = _sorted_probs(_randn(5, k, seed=4, scale=3.0), temperature)
    got = uld_loss(logits, teacher, temperature=temperature)
    _close(got, naive_uld(logits, teacher, None, temperature))


@pytest.mark.parametrize(("vs", "k"), [*ULD_SHAPES, (6, 0)])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_uld_loss_golden_sparse(vs: int, k: int, temperature: float) -> None:
    logits = _randn(5, vs, seed=5, scale=2.0)
    full = _sorted_probs(_randn(5, k + 4, seed=6, scale=3.0), temperature)
    teacher, tail = full[:, :k], full[:, k:].sum(dim=1)
    got = uld_loss(logits, teacher, tail, temperature)
    _close(got, naive_uld(logits, teacher, tail, temperature))


def test_gradcheck_alm_binary_kl_and_uld() -> None:
    s = torch.tensor([-0.3, -2.0, -4.5, -0.9], dtype=F64, requires_grad=True)
    t = torch.tensor([-1.0, -0.2, -3.0, -0.8], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: alm_loss(a, b, 0.7, "binary_kl"), (s, t))
    logits = _randn(2, 5, seed=7, scale=2.0).requires_grad_(True)  # distinct values: the sort is stable
    teacher = _sorted_probs(_randn(2, 4, seed=8, scale=2.0))
    assert torch.autograd.gradcheck(lambda x: uld_loss(x, teacher, temperature=1.3), (logits,))
    top, tail = teacher[:, :2], teacher[:, 2:].sum(dim=1)
    assert torch.autograd.gradcheck(lambda x: uld_loss(x, top, tail, temperature=1.3), (logits,))


# ----------------------------------------------------------------------------------------------------
# Bad arguments: ValueError naming the function, one line
# ----------------------------------------------------------------------------------------------------

_Z = torch.zeros
_I = torch.tensor([0, 1])
_BAD: list[tuple[str, Callable[[], object], str]] = [
    ("tok_rank", lambda: token_logprobs(_Z(2), _I), "token_logprobs: expected (N, V)"),
    ("tok_targets", lambda: token_logprobs(_Z(3, 4), _I), "token_logprobs: expected (N, V)"),
    ("tok_dtype", lambda: token_logprobs(_Z(2, 4), _I.int()), "token_logprobs: targets must be int64"),
    ("tok_range", lambda: token_logprobs(_Z(2, 1), _I), "token_logprobs: targets must lie in [0, 1)"),
    ("tok_temp", lambda: token_logprobs(_Z(2, 4), _I, 0.0), "token_logprobs: temperature"),
    ("sum_rank", lambda: chunk_sums(_Z(2, 1), _I, 2), "chunk_sums: expected (N,)"),
    ("sum_index", lambda: chunk_sums(_Z(3), _I, 2), "chunk_sums: expected (N,)"),
    ("sum_dtype", lambda: chunk_sums(_Z(2), _I.int(), 2), "chunk_sums: chunk_index must be int64"),
    ("sum_range", lambda: chunk_sums(_Z(2), -_I, 2), "chunk_sums: chunk_index must lie in [0, 2)"),
    ("sum_high", lambda: chunk_sums(_Z(2), _I, 1), "chunk_sums: chunk_index must lie in [0, 1)"),
    ("sum_count", lambda: chunk_sums(_Z(2), _I, -1), "chunk_sums: num_chunks must be an int >= 0"),
    ("alm_shape", lambda: alm_loss(_Z(3), _Z(4)), "alm_loss: student and teacher chunk log-probs"),
    ("alm_temp", lambda: alm_loss(_Z(3), _Z(3), -1.0), "alm_loss: temperature must be"),
    ("alm_nan", lambda: alm_loss(_Z(3), _Z(3), math.nan), "alm_loss: temperature must be"),
    ("alm_name", lambda: alm_loss(_Z(3), _Z(3), divergence="kl"), f"one of {ALM_DIVERGENCES}, got 'kl'"),
    ("uld_rank", lambda: uld_loss(_Z(2, 3), _Z(2)), "uld_loss: expected (N, Vs)"),
    ("uld_rows", lambda: uld_loss(_Z(2, 3), _Z(3, 3)), "uld_loss: row counts differ: student 2, teacher 3"),
    ("uld_tail", lambda: uld_loss(_Z(2, 3), _Z(2, 2), _Z(2, 1)), "uld_loss: teacher_tail must be (2,)"),
    ("uld_temp", lambda: uld_loss(_Z(2, 3), _Z(2, 3), None, 0.0), "uld_loss: temperature must be"),
]


@pytest.mark.parametrize(("call", "match"), [(c, m) for _, c, m in _BAD], ids=[n for n, _, _ in _BAD])
def test_bad_arguments_raise_one_line_value_error(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)) as info:
        call()
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------

LOGP = st.one_of(st.floats(-300.0, 0.0), st.sampled_from([0.0, -0.0, -1e-300, -1e-12, -1e-7, -300.0]))
CHUNKS = st.lists(st.tuples(LOGP, LOGP), min_size=1, max_size=8)


@PROPS
@given(CHUNKS, st.sampled_from(ALM_DIVERGENCES), st.floats(0.05, 20.0), st.sampled_from([F64, torch.float32]))
def test_alm_loss_finite_nonnegative_and_zero_on_equal(
    chunks: list[tuple[float, float]], divergence: str, temperature: float, dtype: torch.dtype
) -> None:
    s = torch.tensor([c[0] for c in chunks], dtype=dtype, requires_grad=True)
    t = torch.tensor([c[1] for c in chunks], dtype=dtype, requires_grad=True)
    loss = alm_loss(s, t, temperature, divergence)
    assert loss.dtype == dtype and torch.isfinite(loss).all() and (loss >= 0).all()
    gs, gt = torch.autograd.grad(loss.sum(), [s, t])
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert (alm_loss(t.detach().clone(), t.detach(), temperature, divergence) == 0).all()
    if dtype == F64:
        want = naive_alm(s.detach(), t.detach(), temperature, divergence)
        assert all(math.isfinite(x) for x in want)
        torch.testing.assert_close(loss.detach(), torch.tensor(want, dtype=F64), atol=1e-9, rtol=1e-9)


ULD_ARGS = (st.integers(1, 4), st.integers(1, 9), st.integers(1, 9), TEMPERATURES, SEEDS)


@PROPS
@given(*ULD_ARGS)
def test_uld_loss_ignores_token_order_and_is_zero_on_matching_shape(
    n: int, vs: int, k: int, temperature: float, seed: int
) -> None:
    """Tokenizer-agnostic: permuting the student's vocabulary changes nothing; a teacher whose sorted
    probabilities are the student's (token order aside) costs nothing."""
    logits = _randn(n, vs, seed=seed, scale=3.0)
    perm = torch.randperm(vs, generator=torch.Generator().manual_seed(seed + 1))
    teacher = _sorted_probs(_randn(n, k, seed=seed + 2, scale=3.0), temperature)
    tail = _randn(n, seed=seed + 3).abs() * 0.1
    for extra in (None, tail):
        base = uld_loss(logits, teacher, extra, temperature)
        assert base.shape == (n,) and (base >= 0).all()
        torch.testing.assert_close(
            uld_loss(logits[:, perm], teacher, extra, temperature), base, atol=1e-12, rtol=0
        )
    own = _sorted_probs(logits, temperature)
    assert uld_loss(logits[:, perm], own, temperature=temperature).abs().max() < 1e-12
    top = min(k, vs)
    own_tail = own[:, top:].sum(dim=1)
    assert uld_loss(logits[:, perm], own[:, :top], own_tail, temperature).abs().max() < 1e-12


@PROPS
@given(*ULD_ARGS, st.integers(0, 9))
def test_uld_sparse_is_a_lower_bound_equal_when_complete(
    n: int, vs: int, vt: int, temperature: float, seed: int, cut: int
) -> None:
    logits = _randn(n, vs, seed=seed, scale=3.0)
    full = _sorted_probs(_randn(n, vt, seed=seed + 1, scale=3.0), temperature)
    dense = uld_loss(logits, full, temperature=temperature)
    k = min(cut, vt)
    sparse = uld_loss(logits, full[:, :k], full[:, k:].sum(dim=1), temperature)
    assert (sparse <= dense + 1e-12).all()
    complete = uld_loss(logits, full, torch.zeros(n, dtype=F64), temperature)
    torch.testing.assert_close(complete, dense, atol=1e-12, rtol=0)


@PROPS
@given(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9), SEEDS)
def test_uld_dense_is_symmetric(n: int, va: int, vb: int, seed: int) -> None:
    """A metric: student a against teacher b equals student b against teacher a (logits = log-probs)."""
    a = torch.softmax(_randn(n, va, seed=seed, scale=3.0), dim=1)
    b = torch.softmax(_randn(n, vb, seed=seed + 1, scale=3.0), dim=1)
    ab = uld_loss(a.log(), b.sort(dim=1, descending=True).values)
    ba = uld_loss(b.log(), a.sort(dim=1, descending=True).values)
    torch.testing.assert_close(ab, ba, atol=1e-12, rtol=0)
    assert (ab <= 2 + 1e-12).all()  # L1 between two distributions


def test_half_precision_inputs_compute_in_float32() -> None:
    logits = _randn(3, 6, seed=9, scale=3.0).bfloat16().requires_grad_(True)
    targets = torch.tensor([1, 5, 0])
    logp = token_logprobs(logits, targets)
    sums = chunk_sums(logp, torch.tensor([0, 0, 1]), 2)
    assert logp.dtype == sums.dtype == torch.float32
    teacher = torch.tensor([[-1.5, -0.25]], dtype=torch.bfloat16)
    for divergence in ALM_DIVERGENCES:  # any common shape, here (1, C)
        loss = alm_loss(sums.unsqueeze(0), teacher, 2.0, divergence)
        assert loss.dtype == torch.float32 and loss.shape == (1, 2) and torch.isfinite(loss).all()
    uld = uld_loss(logits, _sorted_probs(_randn(3, 4, seed=10)).bfloat16())
    assert uld.dtype == torch.float32
    (loss.sum() + uld.sum()).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()
