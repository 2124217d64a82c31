"""Sequence log-probabilities, DPO and REDI against naive float64 references (explicit loops, full
softmax), and their defining properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses.preference import dpo_loss, redi_loss, sequence_logprobs

PROPS = settings(max_examples=30, deadline=None)
SEEDS = st.integers(0, 2**16)


def _problem(seed: int, n: int = 11, h: int = 5, v: int = 13, rows: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(n, h, generator=g, dtype=torch.float64).requires_grad_(),
        "weight": (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.8).requires_grad_(),
        "targets": torch.randint(0, v, (n,), generator=g),
        "row_of_token": torch.randint(0, rows, (n,), generator=g),
    }


def naive_sequence_logprobs(p: dict[str, torch.Tensor], rows: int) -> tuple[list[float], list[int]]:
    sums, counts = [0.0] * rows, [0] * rows
    hidden, weight = p["hidden"].detach(), p["weight"].detach()
    for i in range(hidden.shape[0]):
        logits = [float(hidden[i] @ weight[j]) for j in range(weight.shape[0])]
        top = max(logits)
        log_z = top + math.log(sum(math.exp(x - top) for x in logits))
        r = int(p["row_of_token"][i])
        sums[r] += logits[int(p["targets"][i])] - log_z
        counts[r] += 1
    return sums, counts


@pytest.mark.parametrize("chunk_size", [1, 4, 11, 64])
def test_sequence_logprobs_golden(chunk_size: int) -> None:
    p = _problem(3)
    sums, counts = sequence_logprobs(
        p["hidden"], p["weight"], p["targets"], p["row_of_token"], 5, chunk_size=chunk_size
    )
    ref_sums, ref_counts = naive_sequence_logprobs(p, 5)
    torch.testing.assert_close(sums, torch.tensor(ref_sums, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    assert counts.tolist() == ref_counts and ref_counts[4] == 0  # row 4 has no tokens: 0, count 0


def test_sequence_logprobs_gradient_matches_full_softmax() -> None:
    p = _problem(5)
    coef = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)
    sums, _ = sequence_logprobs(p["hidden"], p["weight"], p["targets"], p["row_of_token"], 4, chunk_size=3)
    got = torch.autograd.grad((sums * coef).sum(), [p["hidden"], p["weight"]])
    logp = torch.log_softmax(p["hidden"] @ p["weight"].T, -1).gather(1, p["targets"][:, None]).squeeze(1)
    want = torch.autograd.grad((logp * coef[p["row_of_token"]]).sum(), [p["hidden"], p["weight"]])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_sequence_logprobs_float32_softmax_for_bfloat16() -> None:
    p = _problem(7)
    hidden, weight = p["hidden"].detach().bfloat16(), p["weight"].detach().bfloat16()
    sums, _ = sequence_logprobs(hidden, weight, p["targets"], p["row_of_token"], 4, chunk_size=4)
    assert sums.dtype == torch.float32
    logits = (hidden @ weight.T).float()
    ref = torch.zeros(4).index_add(
        0, p["row_of_token"], torch.log_softmax(logits, -1).gather(1, p["targets"][:, None]).squeeze(1)
    )
    torch.testing.assert_close(sums, ref, rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_refuses_bad_rows() -> None:
    p = _problem(1)
    with pytest.raises(ValueError, match="row_of_token"):
        sequence_logprobs(p["hidden"], p["weight"], p["targets"], p["row_of_token"], 2)
    with pytest.raises(ValueError, match="targets"):
        sequence_logprobs(p["hidden"], p["weight"], p["targets"] - 100, p["row_of_token"], 4)


@PROPS
@given(SEEDS, st.integers(1, 12), st.integers(1, 6))
def test_sequence_logprobs_invariant_to_chunk_size(seed: int, a: int, b: int) -> None:
    p = _problem(seed)
    args = (p["hidden"], p["weight"], p["targets"], p["row_of_token"], 4)
    sa, ca = sequence_logprobs(*args, chunk_size=a)
    sb, cb = sequence_logprobs(*args, chunk_size=b)
    torch.testing.assert_close(sa, sb, rtol=1e-12, atol=1e-12)
    assert torch.equal(ca, cb)
    assert bool((sa <= 0).all())


def naive_dpo(pc: float, pr: float, rc: float, rr: float, beta: float) -> float:
    z = beta * ((pc - rc) - (pr - rr))
    return math.log1p(math.exp(-z)) if z > -30 else -z + math.log1p(math.exp(z))


def test_dpo_golden() -> None:
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(9, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    got = dpo_loss(pc, pr, rc, rr, beta=0.3)
    want = [naive_dpo(float(pc[i]), float(pr[i]), float(rc[i]), float(rr[i]), 0.3) for i in range(9)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    huge = dpo_loss(torch.tensor([-1e4]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 1.0)
    assert torch.isfinite(huge).all() and float(huge) == pytest.approx(1e4)


@PROPS
@given(st.floats(-50, 50), st.floats(-50, 50), st.floats(0.01, 2.0))
def test_dpo_at_zero_margin_is_log_two(ref_c: float, ref_r: float, beta: float) -> None:
    # policy == reference: every log-ratio is 0
    pc, pr = torch.tensor([ref_c], dtype=torch.float64), torch.tensor([ref_r], dtype=torch.float64)
    assert float(dpo_loss(pc, pr, pc.clone(), pr.clone(), beta)) == pytest.approx(math.log(2), abs=1e-12)


@PROPS
@given(st.floats(-20, 20), st.floats(0.01, 10), st.floats(0.05, 2.0))
def test_dpo_decreases_as_the_chosen_margin_grows(start: float, step: float, beta: float) -> None:
    zero = torch.zeros(1, dtype=torch.float64)
    low = dpo_loss(torch.tensor([start], dtype=torch.float64), zero, zero, zero, beta)
    high = dpo_loss(torch.tensor([start + step], dtype=torch.float64), zero, zero, zero, beta)
    assert float(high) < float(low)


def naive_redi(lc: float, lr: float, nc: int, nr: int, alpha: float, norm: bool) -> float:
    if norm:
        return -lc / max(nc, 1) + alpha * lr / max(nr, 1)
    return -lc + alpha * lr


@pytest.mark.parametrize("norm", [True, False])
def test_redi_golden(norm: bool) -> None:
    g = torch.Generator().manual_seed(1)
    lc = -torch.rand(7, generator=g, dtype=torch.float64) * 30
    lr = -torch.rand(7, generator=g, dtype=torch.float64) * 30
    nc, nr = torch.randint(0, 9, (7,), generator=g), torch.randint(1, 9, (7,), generator=g)
    got = redi_loss(lc, lr, nc, nr, alpha=0.8, length_normalize=norm)
    want = [naive_redi(float(lc[i]), float(lr[i]), int(nc[i]), int(nr[i]), 0.8, norm) for i in range(7)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@PROPS
@given(st.floats(-100, 0), st.floats(-100, 0), st.integers(1, 50), st.integers(1, 50))
def test_redi_alpha_zero_is_the_chosen_nll_per_token(lc: float, lr: float, nc: int, nr: int) -> None:
    got = redi_loss(torch.tensor([lc]), torch.tensor([lr]), torch.tensor([nc]), torch.tensor([nr]), alpha=0.0)
    assert float(got) == pytest.approx(-lc / nc, rel=1e-6, abs=1e-6)


@PROPS
@given(st.floats(-100, 0), st.floats(-100, 0), st.integers(1, 50), st.integers(1, 50), st.floats(0, 1))
def test_redi_gradient_on_the_rejected_is_alpha_per_token(
    lc: float, lr: float, nc: int, nr: int, alpha: float
) -> None:
    chosen = torch.tensor([lc], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([lr], dtype=torch.float64, requires_grad=True)
    loss = redi_loss(chosen, rejected, torch.tensor([nc]), torch.tensor([nr]), alpha)
    d_chosen, d_rejected = torch.autograd.grad(loss.sum(), [chosen, rejected])
    assert float(d_rejected) == pytest.approx(alpha / nr, abs=1e-12)
    assert float(d_chosen) == pytest.approx(-1 / nc, abs=1e-12)


def test_bad_coefficients_are_refused() -> None:
    one = torch.zeros(1)
    with pytest.raises(ValueError, match="alpha"):
        redi_loss(one, one, one.long(), one.long(), alpha=1.5)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(one, one, one, one, beta=0.0)
