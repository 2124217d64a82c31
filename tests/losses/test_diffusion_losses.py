"""Score-distillation generator losses: values and gradients against naive float64 references (explicit
loops, and for SiD the hand-derived gradient through linear score networks), and properties: the DMD /
VSD surrogates' gradient is exactly their update direction, SiD vanishes with its gradient when the
fake score equals the real one, scale behaviour, the GAN losses."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses.diffusion import (
    dmd_gradient,
    dmd_surrogate,
    gan_critic_loss,
    gan_generator_loss,
    sid_loss,
    vsd_surrogate,
)

PROPS = settings(max_examples=25, deadline=None)
F64 = torch.float64
SEEDS = st.integers(0, 2**31 - 1)


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def _close(got: torch.Tensor, want: torch.Tensor | list[float], atol: float = 1e-12) -> None:
    want = torch.as_tensor(want, dtype=F64)
    assert got.dtype == F64 and got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-10)


def _leaf(v: torch.Tensor) -> torch.Tensor:
    return v.clone().requires_grad_(True)


# ----------------------------------------------------------------------------------------------------
# Golden references
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3), (3, 1, 2, 2)])
def test_dmd_surrogate_golden(shape: tuple[int, ...]) -> None:
    x, real, fake = _leaf(_randn(*shape, seed=1)), _randn(*shape, seed=2), _randn(*shape, seed=3, scale=0.5)
    loss = dmd_surrogate(x, real, fake)
    loss.sum().backward()
    xs, rs, fs = (v.detach().flatten(1).tolist() for v in (x, real, fake))
    want, want_grad = [], []
    for xr, rr, fr in zip(xs, rs, fs, strict=True):
        d = len(xr)
        scale = sum(abs(a - b) for a, b in zip(xr, rr, strict=True)) / d
        g = [(f - r) / scale for f, r in zip(fr, rr, strict=True)]
        want.append(0.5 * sum(v * v for v in g) / d)
        want_grad.append([v / d for v in g])
    _close(loss, want)
    assert x.grad is not None
    _close(x.grad.flatten(1), want_grad)


def test_vsd_surrogate_golden() -> None:
    x, er, ef = _leaf(_randn(5, 3, seed=4)), _randn(5, 3, seed=5), _randn(5, 3, seed=6)
    w = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=F64)
    loss = vsd_surrogate(x, er, ef, w)
    loss.sum().backward()
    want, want_grad = [], []
    for i in range(5):
        g = [float(w[i]) * (float(er[i, j]) - float(ef[i, j])) for j in range(3)]
        want.append(0.5 * sum(v * v for v in g) / 3)
        want_grad.append([v / 3 for v in g])
    _close(loss, want)
    assert x.grad is not None
    _close(x.grad, want_grad)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.2])
def test_sid_value_golden(alpha: float) -> None:
    x, real, fake = _randn(4, 3, seed=7), _randn(4, 3, seed=8), _randn(4, 3, seed=9)
    want = []
    for i in range(4):
        xr, rr, fr = x[i].tolist(), real[i].tolist(), fake[i].tolist()
        scale = sum(abs(a - b) for a, b in zip(xr, rr, strict=True)) / 3
        sq = sum((r - f) ** 2 for r, f in zip(rr, fr, strict=True)) / 3
        cross = sum((r - f) * (f - a) for r, f, a in zip(rr, fr, xr, strict=True)) / 3
        want.append(((1 - alpha) * sq + cross) / scale)
    _close(sid_loss(x, real, fake, alpha), want)


def test_sid_gradient_through_linear_score_networks_matches_the_hand_derivation() -> None:
    """real = A x + b, fake = C x + c: with s the (detached) normaliser, delta = real - fake and
    phi = fake - x, d/dx of the row's loss is [2(1 - alpha)(A - C)^T delta + (A - C)^T phi
    + (C - I)^T delta] / (D s)."""
    d, alpha = 3, 1.2
    a_mat, c_mat = _randn(d, d, seed=10), _randn(d, d, seed=11)
    b_vec, c_vec = _randn(d, seed=12), _randn(d, seed=13)
    x = _leaf(_randn(4, d, seed=14))
    real, fake = x @ a_mat.T + b_vec, x @ c_mat.T + c_vec
    sid_loss(x, real, fake, alpha).sum().backward()
    assert x.grad is not None
    eye = torch.eye(d, dtype=F64)
    for i in range(4):
        xi = x[i].detach()
        r, f = a_mat @ xi + b_vec, c_mat @ xi + c_vec
        delta, phi, s = r - f, f - xi, float((xi - r).abs().mean())
        want = 2 * (1 - alpha) * (a_mat - c_mat).T @ delta + (a_mat - c_mat).T @ phi + (c_mat - eye).T @ delta
        _close(x.grad[i], want / (d * s), atol=1e-11)


def test_gan_losses_golden() -> None:
    real, fake = torch.tensor([2.0, -1.0, 0.0], dtype=F64), torch.tensor([0.5, 3.0, -2.0], dtype=F64)

    def softplus(v: float) -> float:
        return math.log1p(math.exp(v))

    _close(gan_generator_loss(fake), [softplus(-v) for v in fake.tolist()])
    want = [softplus(-r) + softplus(f) for r, f in zip(real.tolist(), fake.tolist(), strict=True)]
    _close(gan_critic_loss(real, fake), want)


def test_a_sample_on_the_teachers_estimate_does_not_divide_by_zero() -> None:
    x = _leaf(torch.ones(2, 3, dtype=F64))
    loss = dmd_surrogate(x, x.detach().clone(), torch.zeros(2, 3, dtype=F64)) + sid_loss(
        x, x.detach().clone(), torch.zeros(2, 3, dtype=F64), 1.2
    )
    loss.sum().backward()
    assert bool(torch.isfinite(loss).all()) and x.grad is not None and bool(torch.isfinite(x.grad).all())


# ----------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------


@PROPS
@given(seed=SEEDS, b=st.integers(1, 5), d=st.integers(1, 6), scale=st.floats(0.01, 100.0))
def test_dmd_gradient_is_exactly_the_normalised_score_difference(
    seed: int, b: int, d: int, scale: float
) -> None:
    x = _leaf(_randn(b, d, seed=seed, scale=scale))
    real, fake = _randn(b, d, seed=seed + 1, scale=scale), _randn(b, d, seed=seed + 2, scale=scale)
    dmd_surrogate(x, real, fake).sum().backward()
    want = (fake - real) / (x.detach() - real).abs().sum(1, keepdim=True)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, want, atol=1e-12, rtol=1e-10)
    # and the direction does not depend on the data's scale
    torch.testing.assert_close(
        dmd_gradient(x / scale, real / scale, fake / scale), dmd_gradient(x, real, fake)
    )


@PROPS
@given(seed=SEEDS, b=st.integers(1, 5), d=st.integers(1, 6))
def test_vsd_gradient_is_exactly_the_weighted_eps_difference(seed: int, b: int, d: int) -> None:
    x, er, ef = _leaf(_randn(b, d, seed=seed)), _randn(b, d, seed=seed + 1), _randn(b, d, seed=seed + 2)
    w = torch.rand(b, generator=torch.Generator().manual_seed(seed), dtype=F64)
    vsd_surrogate(x, er, ef, w).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, w[:, None] * (er - ef) / d, atol=1e-12, rtol=1e-10)


@PROPS
@given(seed=SEEDS, b=st.integers(1, 5), d=st.integers(1, 6), alpha=st.floats(0.0, 2.0))
def test_sid_with_fake_equal_to_real_is_zero_with_zero_gradient(
    seed: int, b: int, d: int, alpha: float
) -> None:
    """Both scores the same nonlinear function of x_g: loss 0, and the terms through the two networks
    cancel exactly, so the gradient is 0 (not just the explicit -(real - fake) term)."""
    w = _randn(d, d, seed=seed + 1)
    x = _leaf(_randn(b, d, seed=seed))

    def score(v: torch.Tensor) -> torch.Tensor:
        return torch.tanh(v @ w.T) + 0.5 * v

    loss = sid_loss(x, score(x), score(x), alpha)
    loss.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(loss, torch.zeros(b, dtype=F64), atol=1e-14, rtol=0)
    torch.testing.assert_close(x.grad, torch.zeros(b, d, dtype=F64), atol=1e-13, rtol=0)


@PROPS
@given(seed=SEEDS, b=st.integers(1, 5), d=st.integers(1, 6), c=st.floats(0.01, 100.0))
def test_sid_scales_linearly_with_the_data(seed: int, b: int, d: int, c: float) -> None:
    x, real, fake = (_randn(b, d, seed=seed + k) for k in range(3))
    torch.testing.assert_close(sid_loss(c * x, c * real, c * fake, 1.2), c * sid_loss(x, real, fake, 1.2))


@PROPS
@given(seed=SEEDS, b=st.integers(1, 5), d=st.integers(1, 6))
def test_sid_explicit_gradient_pushes_toward_real_away_from_fake(seed: int, b: int, d: int) -> None:
    """With constant scores only the cross term depends on x_g: d/dx_g = (fake - real) / (D s), exactly
    the gradient of DMD's surrogate (descent moves x_g toward the real estimate, away from the fake)."""
    x, real, fake = _leaf(_randn(b, d, seed=seed)), _randn(b, d, seed=seed + 1), _randn(b, d, seed=seed + 2)
    sid_loss(x, real, fake, 1.2).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, dmd_gradient(x, real, fake) / d, atol=1e-12, rtol=1e-10)
