"""Classifier logit losses: naive float64 references (explicit loops), identities, properties, stability."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from distill.losses.classifier_logits import (
    dist_loss,
    dkd_loss,
    ensemble_log_probs,
    kd_loss,
    kd_loss_from_log_probs,
    soft_cross_entropy,
    standardize_logits,
    standardized_kd_loss,
)

PROPS = settings(max_examples=50, deadline=None)
TEMPS = [0.5, 1.0, 4.0]


# ----------------------------------------------------------------------------------------------------
# Naive oracle: Python floats, explicit sums, probabilities (not log-probabilities).
# ----------------------------------------------------------------------------------------------------


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    top = max(row)
    e = [math.exp((x - top) / t) for x in row]
    total = sum(e)
    return [x / total for x in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def naive_kd(s: torch.Tensor, t: torch.Tensor, temp: float) -> list[float]:
    return [
        temp**2 * _kl(_softmax(b, temp), _softmax(a, temp))
        for a, b in zip(s.tolist(), t.tolist(), strict=True)
    ]


def naive_dkd(
    s: torch.Tensor, t: torch.Tensor, y: list[int], alpha: list[float], beta: list[float], temp: float
) -> list[float]:
    out = []
    for i, (a, b) in enumerate(zip(s.tolist(), t.tolist(), strict=True)):
        ps, pt = _softmax(a, temp), _softmax(b, temp)
        rest_s = sum(v for j, v in enumerate(ps) if j != y[i])
        rest_t = sum(v for j, v in enumerate(pt) if j != y[i])
        tckd = _kl([pt[y[i]], rest_t], [ps[y[i]], rest_s])
        nt_s = [v / rest_s for j, v in enumerate(ps) if j != y[i]]
        nt_t = [v / rest_t for j, v in enumerate(pt) if j != y[i]]
        out.append(temp**2 * (alpha[i] * tckd + beta[i] * _kl(nt_t, nt_s)))
    return out


def _pearson(a: list[float], b: list[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (z - mb) for x, z in zip(a, b, strict=True))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((z - mb) ** 2 for z in b)
    return cov / math.sqrt(va * vb)


def naive_dist(s: torch.Tensor, t: torch.Tensor, beta: float, gamma: float, temp: float) -> float:
    ps = [_softmax(r, temp) for r in s.tolist()]
    pt = [_softmax(r, temp) for r in t.tolist()]
    inter = sum(1 - _pearson(a, b) for a, b in zip(ps, pt, strict=True)) / len(ps)
    cols = range(len(ps[0]))
    intra = sum(1 - _pearson([r[c] for r in ps], [r[c] for r in pt]) for c in cols) / len(cols)
    return temp**2 * (beta * inter + gamma * intra)


def naive_standardize(row: list[float], eps: float = 1e-7) -> list[float]:
    m = sum(row) / len(row)
    sd = math.sqrt(sum((x - m) ** 2 for x in row) / len(row))
    return [(x - m) / (sd + eps) for x in row]


def _logits(
    b: int = 6, c: int = 10, seed: int = 0, scale: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    t = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, c, (b,), generator=g)
    return s, t, y


shapes = st.tuples(st.integers(1, 6), st.integers(2, 9), st.integers(0, 2**31 - 1), st.floats(0.1, 20.0))


# ----------------------------------------------------------------------------------------------------
# KD
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temp", TEMPS)
def test_kd_golden(temp: float) -> None:
    s, t, _ = _logits()
    torch.testing.assert_close(
        kd_loss(s, t, temp), torch.tensor(naive_kd(s, t, temp), dtype=torch.float64), atol=1e-10, rtol=1e-9
    )


@PROPS
@given(shapes, st.floats(0.3, 5.0))
def test_kd_nonnegative_zero_on_equal_and_shift_invariant(
    shape: tuple[int, int, int, float], temp: float
) -> None:
    b, c, seed, scale = shape
    s, t, _ = _logits(b, c, seed, scale)
    loss = kd_loss(s, t, temp)
    assert loss.shape == (b,)
    assert (loss >= -1e-12).all()
    assert kd_loss(t, t, temp).abs().max() < 1e-12
    torch.testing.assert_close(kd_loss(s + 7.5, t - 3.0, temp), loss, atol=1e-9, rtol=1e-9)


def test_kd_rejects_bad_temperature_and_shapes() -> None:
    s, t, _ = _logits()
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, 0.0)
    with pytest.raises(ValueError, match="logits"):
        kd_loss(s, t[:, :-1], 1.0)


def test_kd_half_inputs_computed_in_float32() -> None:
    s, t, _ = _logits()
    out = kd_loss(s.to(torch.bfloat16), t.to(torch.bfloat16), 2.0)
    assert out.dtype == torch.float32
    ref = kd_loss(s.to(torch.bfloat16).double(), t.to(torch.bfloat16).double(), 2.0)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# DKD
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temp", TEMPS)
def test_dkd_golden(temp: float) -> None:
    s, t, y = _logits(seed=1)
    alpha = [0.5 + 0.1 * i for i in range(6)]
    beta = [8.0 - i for i in range(6)]
    want = torch.tensor(naive_dkd(s, t, y.tolist(), alpha, beta, temp), dtype=torch.float64)
    got = dkd_loss(
        s, t, y, torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64), temp
    )
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    got_float = dkd_loss(s, t, y, 1.0, 8.0, temp)
    torch.testing.assert_close(
        got_float,
        torch.tensor(naive_dkd(s, t, y.tolist(), [1.0] * 6, [8.0] * 6, temp), dtype=torch.float64),
        atol=1e-10,
        rtol=1e-9,
    )


@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0, 4.0, 10.0])
def test_dkd_identity_equals_kd(temp: float) -> None:
    """MUST-HAVE: KL = TCKD + (1 - p_t[target]) * NCKD, so alpha = 1, beta = 1 - p_t(target) at T is KD."""
    s, t, y = _logits(b=16, c=12, seed=2, scale=4.0)
    p_target = torch.softmax(t / temp, dim=-1).gather(1, y.unsqueeze(1)).squeeze(1)
    got = dkd_loss(s, t, y, 1.0, 1.0 - p_target, temp)
    torch.testing.assert_close(got, kd_loss(s, t, temp), atol=1e-10, rtol=0)


@PROPS
@given(shapes, st.floats(0.3, 5.0))
def test_dkd_identity_property(shape: tuple[int, int, int, float], temp: float) -> None:
    b, c, seed, scale = shape
    s, t, y = _logits(b, c, seed, scale)
    p_target = torch.softmax(t / temp, dim=-1).gather(1, y.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(
        dkd_loss(s, t, y, 1.0, 1.0 - p_target, temp), kd_loss(s, t, temp), atol=1e-10, rtol=1e-9
    )


@PROPS
@given(shapes, st.floats(-50.0, 50.0), st.floats(-50.0, 50.0))
def test_dkd_shift_invariant_and_nonnegative(
    shape: tuple[int, int, int, float], cs: float, ct: float
) -> None:
    b, c, seed, scale = shape
    s, t, y = _logits(b, c, seed, scale)
    loss = dkd_loss(s, t, y, 1.0, 8.0, 2.0)
    assert (loss >= -1e-12).all()
    torch.testing.assert_close(dkd_loss(s + cs, t + ct, y, 1.0, 8.0, 2.0), loss, atol=1e-9, rtol=1e-8)
    assert dkd_loss(t, t, y, 1.0, 8.0, 2.0).abs().max() < 1e-12


def test_dkd_weight_shape_checked() -> None:
    s, t, y = _logits()
    with pytest.raises(ValueError, match="weight"):
        dkd_loss(s, t, y, torch.ones(3), 1.0, 1.0)
    with pytest.raises(ValueError, match="target"):
        dkd_loss(s, t, y[:2], 1.0, 1.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# DIST
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("beta", "gamma", "temp"), [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0), (0.0, 1.0, 2.0)])
def test_dist_golden(beta: float, gamma: float, temp: float) -> None:
    s, t, _ = _logits(b=7, c=9, seed=3, scale=2.0)
    got = dist_loss(s, t, beta=beta, gamma=gamma, temperature=temp)
    assert got.shape == ()
    assert abs(got.item() - naive_dist(s, t, beta, gamma, temp)) < 1e-10


@PROPS
@given(st.integers(2, 6), st.integers(2, 9), st.integers(0, 2**31 - 1), st.floats(0.5, 8.0))
def test_dist_zero_on_equal_and_bounded(b: int, c: int, seed: int, scale: float) -> None:
    s, t, _ = _logits(b, c, seed, scale)
    p = torch.softmax(t / 2.0, -1)
    rows, cols = p - p.mean(1, keepdim=True), p - p.mean(0, keepdim=True)
    # A row or column whose spread is under the loss's 1e-8 clamp counts as correlation 0 by design
    # (finite gradients); "zero on equal inputs" holds where every spread is above it.
    assume(float(rows.norm(dim=1).min()) > 1e-3 and float(cols.norm(dim=0).min()) > 1e-3)
    assert abs(dist_loss(t, t, temperature=2.0).item()) < 1e-9
    value = dist_loss(s, t, beta=1.0, gamma=1.0, temperature=2.0).item()
    assert -1e-9 <= value <= 4.0 * 2 * 2.0**2 + 1e-9  # 1 - pearson lies in [0, 2]


def test_dist_zero_variance_is_finite() -> None:
    z = torch.zeros(1, 5, dtype=torch.float64, requires_grad=True)
    loss = dist_loss(z, torch.zeros(1, 5, dtype=torch.float64))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# Logit standardisation
# ----------------------------------------------------------------------------------------------------


def test_standardize_golden() -> None:
    s, _, _ = _logits(seed=4)
    want = torch.tensor([naive_standardize(r) for r in s.tolist()], dtype=torch.float64)
    torch.testing.assert_close(standardize_logits(s), want, atol=1e-12, rtol=1e-10)


@PROPS
@given(shapes, st.floats(0.01, 100.0), st.floats(-1e3, 1e3))
def test_standardized_kd_affine_invariant(shape: tuple[int, int, int, float], a: float, shift: float) -> None:
    b, c, seed, scale = shape
    s, t, _ = _logits(b, c, seed, scale)
    z = standardize_logits(s, eps=0.0)
    torch.testing.assert_close(z.mean(dim=-1), torch.zeros(b, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close((z * z).mean(dim=-1), torch.ones(b, dtype=torch.float64), atol=1e-9, rtol=0)
    # exact invariance needs eps = 0 (eps only guards a zero std; it matters when std ~ eps * 1e4)
    base = kd_loss(z, standardize_logits(t, eps=0.0), 2.0)
    moved = kd_loss(standardize_logits(a * s + shift, eps=0.0), standardize_logits(t, eps=0.0), 2.0)
    torch.testing.assert_close(moved, base, atol=1e-8, rtol=1e-8)
    want = kd_loss(standardize_logits(s), standardize_logits(t), 2.0)
    torch.testing.assert_close(standardized_kd_loss(s, t, 2.0), want, atol=0, rtol=0)


def test_standardize_constant_row_has_finite_gradient() -> None:
    z = torch.full((2, 4), 3.0, requires_grad=True)
    out = standardize_logits(z)
    out.sum().backward()
    assert (out == 0).all() and torch.isfinite(z.grad).all()  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# Ensembles and soft targets
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temp", TEMPS)
def test_ensemble_log_probs_golden(temp: float) -> None:
    members = [_logits(seed=10 + k)[0] for k in range(3)]
    got = ensemble_log_probs(members, temp)
    for i in range(6):
        probs = [_softmax(m[i].tolist(), temp) for m in members]
        for c in range(10):
            assert abs(got[i, c].item() - math.log(sum(p[c] for p in probs) / 3)) < 1e-10
    torch.testing.assert_close(got.exp().sum(dim=-1), torch.ones(6, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("temp", TEMPS)
def test_kd_from_log_probs_matches_kd_and_naive(temp: float) -> None:
    s, t, _ = _logits(seed=5)
    torch.testing.assert_close(
        kd_loss_from_log_probs(s, ensemble_log_probs([t], temp), temp),
        kd_loss(s, t, temp),
        atol=1e-12,
        rtol=0,
    )
    members = [t, t.flip(0), 0.5 * t]
    got = kd_loss_from_log_probs(s, ensemble_log_probs(members, temp), temp)
    for i in range(6):
        avg = [sum(vals) / 3 for vals in zip(*[_softmax(m[i].tolist(), temp) for m in members], strict=True)]
        assert abs(got[i].item() - temp**2 * _kl(avg, _softmax(s[i].tolist(), temp))) < 1e-10


def test_kd_from_log_probs_masked_teacher_entries() -> None:
    s, t, _ = _logits(seed=6)
    log_p = torch.log_softmax(t.masked_fill(torch.arange(10) < 3, -math.inf), dim=-1)
    got = kd_loss_from_log_probs(s, log_p, 1.0)
    assert torch.isfinite(got).all()
    want = [_kl(p, _softmax(r)) for p, r in zip(log_p.exp().tolist(), s.tolist(), strict=True)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-10, rtol=1e-9)


def test_soft_cross_entropy_golden_and_mixup_linearity() -> None:
    s, t, y = _logits(seed=7)
    q = torch.softmax(t, dim=-1)
    want = [
        -sum(qi * math.log(pi) for qi, pi in zip(qr, _softmax(sr), strict=True))
        for qr, sr in zip(q.tolist(), s.tolist(), strict=True)
    ]
    torch.testing.assert_close(
        soft_cross_entropy(s, q), torch.tensor(want, dtype=torch.float64), atol=1e-10, rtol=1e-9
    )
    one_hot = torch.nn.functional.one_hot(y, 10).double()
    torch.testing.assert_close(
        soft_cross_entropy(s, one_hot), torch.nn.functional.cross_entropy(s, y, reduction="none")
    )
    y2 = y.flip(0)
    lam = 0.3
    mixed = soft_cross_entropy(s, lam * one_hot + (1 - lam) * torch.nn.functional.one_hot(y2, 10).double())
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(
        mixed, lam * ce(s, y, reduction="none") + (1 - lam) * ce(s, y2, reduction="none")
    )


# ----------------------------------------------------------------------------------------------------
# Stability under extreme logits
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["kd", "dkd", "dist", "std_kd", "ensemble", "soft_ce"])
def test_extreme_logits_finite_values_and_gradients(name: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(8)
    sign = torch.randint(0, 2, (6, 10), generator=g) * 2 - 1
    s = (sign * 1e4).to(dtype).requires_grad_(True)
    t = (-sign * 1e4).to(dtype)  # teacher disagrees everywhere: the hardest case
    t[:, 0] = 1e4
    y = torch.tensor([0, 1, 2, 3, 4, 0])  # target both where the teacher is confident and where it is not
    t_low = t.clone()
    t_low[:, 5] = -1e4
    fns = {
        "kd": lambda: kd_loss(s, t, 2.0),
        "dkd": lambda: (
            dkd_loss(s, t, y, 1.0, 8.0, 1.0) + dkd_loss(s, t_low, y, torch.ones(6), torch.ones(6), 4.0)
        ),
        "dist": lambda: dist_loss(s, t, temperature=1.0),
        "std_kd": lambda: standardized_kd_loss(s, t, 2.0),
        "ensemble": lambda: kd_loss_from_log_probs(s, ensemble_log_probs([t, t_low, -t], 1.0), 1.0),
        "soft_ce": lambda: soft_cross_entropy(s, torch.softmax(t, dim=-1)),
    }
    loss = fns[name]()
    assert torch.isfinite(loss).all(), loss
    loss.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
