"""Ranking losses: naive float64 references (explicit loops), invariances, shapes, stability."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses.ranking import listwise_kl_loss, margin_mse_loss

PROPS = settings(max_examples=30, deadline=None)
F64 = torch.float64
SEEDS = st.integers(0, 2**31 - 1)


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def _close(got: torch.Tensor, want: list[float]) -> None:
    assert got.dtype == F64 and got.shape == (len(want),)
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), atol=1e-10, rtol=0)


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(x - top) for x in row]
    return [x / sum(e) for x in e]


# ----------------------------------------------------------------------------------------------------
# Golden references
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 4])
def test_margin_mse_golden(n: int) -> None:
    sp, tp = _randn(5, seed=1), _randn(5, seed=2, scale=0.3)
    sn, tn = _randn(5, n, seed=3), _randn(5, n, seed=4, scale=0.3)
    want = []
    for i in range(5):
        total = 0.0
        for j in range(n):
            total += ((sp[i] - sn[i, j]) - (tp[i] - tn[i, j])).item() ** 2
        want.append(total / n)
    _close(margin_mse_loss(sp, sn, tp, tn), want)


def test_margin_mse_triples_are_one_negative() -> None:
    sp, sn, tp, tn = (_randn(6, seed=s) for s in range(4))
    want = [
        ((a - b) - (c - d)) ** 2 for a, b, c, d in zip(*(x.tolist() for x in (sp, sn, tp, tn)), strict=True)
    ]
    _close(margin_mse_loss(sp, sn, tp, tn), want)
    torch.testing.assert_close(
        margin_mse_loss(sp, sn, tp, tn), margin_mse_loss(sp, sn[:, None], tp, tn[:, None])
    )


@pytest.mark.parametrize("tau", [0.05, 1.0, 3.0])
def test_listwise_kl_golden(tau: float) -> None:
    s, t = _randn(4, 6, seed=5), _randn(4, 6, seed=6, scale=0.4)
    want = []
    for srow, trow in zip(s.tolist(), t.tolist(), strict=True):
        p = _softmax([x / tau for x in trow])
        q = _softmax([x / tau for x in srow])
        want.append(sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0))
    _close(listwise_kl_loss(s, t, tau), want)


_BAD: list[tuple[str, Callable[[], object], str]] = [
    ("pos_rank", lambda: margin_mse_loss(torch.zeros(3, 1), torch.zeros(3), torch.zeros(3, 1), torch.zeros(3)), "(B,)"),
    ("pos_shape", lambda: margin_mse_loss(torch.zeros(3), torch.zeros(3), torch.zeros(4), torch.zeros(3)), "(B,)"),
    ("neg_b", lambda: margin_mse_loss(torch.zeros(3), torch.zeros(2, 2), torch.zeros(3), torch.zeros(2, 2)), "B=3"),
    ("neg_none", lambda: margin_mse_loss(torch.zeros(3), torch.zeros(3, 0), torch.zeros(3), torch.zeros(3, 0)), "B=3"),
    ("neg_pair", lambda: margin_mse_loss(torch.zeros(3), torch.zeros(3, 2), torch.zeros(3), torch.zeros(3, 3)), "differ"),
    ("list_shape", lambda: listwise_kl_loss(torch.zeros(3, 2), torch.zeros(3, 3)), "same shape"),
    ("list_one", lambda: listwise_kl_loss(torch.zeros(3, 1), torch.zeros(3, 1)), "at least 2"),
    ("list_tau", lambda: listwise_kl_loss(torch.zeros(3, 2), torch.zeros(3, 2), 0.0), "temperature"),
    ("list_nan", lambda: listwise_kl_loss(torch.zeros(3, 2), torch.zeros(3, 2), math.nan), "temperature"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "match"), [(c, m) for _, c, m in _BAD], ids=[n for n, _, _ in _BAD])
def test_bad_shapes_raise_one_line_value_error(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)) as info:
        call()
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------


@PROPS
@given(st.integers(1, 6), st.integers(1, 5), SEEDS, st.floats(-50, 50), st.floats(-50, 50))
def test_margin_mse_zero_on_equal_margins_nonnegative_and_shift_invariant(
    b: int, n: int, seed: int, shift_s: float, shift_t: float
) -> None:
    tp, tn = _randn(b, seed=seed, scale=0.5), _randn(b, n, seed=seed + 1, scale=0.5)
    # the same margins on another scale's offset (a per-query shift): loss 0
    offset = _randn(b, seed=seed + 2, scale=10.0)
    same = margin_mse_loss(tp + offset, tn + offset[:, None], tp, tn)
    assert same.shape == (b,) and same.abs().max() < 1e-10
    sp, sn = _randn(b, seed=seed + 3), _randn(b, n, seed=seed + 4)
    base = margin_mse_loss(sp, sn, tp, tn)
    assert (base >= 0).all()
    shifted = margin_mse_loss(sp + shift_s, sn + shift_s, tp + shift_t, tn + shift_t)
    torch.testing.assert_close(shifted, base, atol=1e-9, rtol=1e-9)


@PROPS
@given(st.integers(1, 6), st.integers(2, 5), SEEDS, st.floats(-50, 50), st.sampled_from([0.05, 1.0]))
def test_listwise_zero_on_equal_nonnegative_and_shift_invariant(
    b: int, c: int, seed: int, shift: float, tau: float
) -> None:
    t = _randn(b, c, seed=seed, scale=0.5)
    assert listwise_kl_loss(t.clone(), t, tau).abs().max() < 1e-12
    s = _randn(b, c, seed=seed + 1)
    base = listwise_kl_loss(s, t, tau)
    assert (base >= -1e-12).all()
    torch.testing.assert_close(listwise_kl_loss(s + shift, t, tau), base, atol=1e-8, rtol=1e-8)


@PROPS
@given(st.integers(1, 6), st.integers(1, 4), SEEDS)
def test_margin_mse_per_query_and_order_of_negatives_irrelevant(b: int, n: int, seed: int) -> None:
    sp, tp = _randn(b, seed=seed), _randn(b, seed=seed + 1)
    sn, tn = _randn(b, n, seed=seed + 2), _randn(b, n, seed=seed + 3)
    whole = margin_mse_loss(sp, sn, tp, tn)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(margin_mse_loss(sp, sn[:, perm], tp, tn[:, perm]), whole)
    for i in range(b):  # one query's loss depends on its own row only
        one = margin_mse_loss(sp[i : i + 1], sn[i : i + 1], tp[i : i + 1], tn[i : i + 1])
        torch.testing.assert_close(one, whole[i : i + 1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_compute_in_float32(dtype: torch.dtype) -> None:
    sp, sn, tp, tn = (_randn(4, 3, seed=s).to(dtype) for s in range(4))
    got = margin_mse_loss(sp[:, 0], sn, tp[:, 0], tn)
    assert got.dtype == torch.float32
    want = margin_mse_loss(*(x.double() for x in (sp[:, 0], sn, tp[:, 0], tn)))
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    big = listwise_kl_loss(sp * 1e3, tp * 1e3, 0.05)
    assert big.dtype == torch.float32 and torch.isfinite(big).all()


def test_gradients_reach_the_student_and_pull_margins_together() -> None:
    sp = torch.zeros(3, dtype=F64, requires_grad=True)
    sn = torch.zeros(3, 2, dtype=F64, requires_grad=True)
    tp, tn = torch.ones(3, dtype=F64), torch.zeros(3, 2, dtype=F64)
    margin_mse_loss(sp, sn, tp, tn).sum().backward()
    assert sp.grad is not None and sn.grad is not None
    assert (sp.grad < 0).all() and (sn.grad > 0).all()  # raise the positive, lower the negatives
    s = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    listwise_kl_loss(s, torch.tensor([[2.0, 0.0, 0.0]] * 2, dtype=F64), 1.0).sum().backward()
    assert s.grad is not None and (s.grad[:, 0] < 0).all() and torch.isfinite(s.grad).all()
