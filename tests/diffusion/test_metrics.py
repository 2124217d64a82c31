"""Sample-quality metrics: golden values against naive float64 references (plain loops / numpy / scipy),
plus properties that must hold for any input (identity, symmetry, monotone in a shift, separation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.diffusion.metrics import (
    frechet_distance,
    mmd_rbf,
    mode_coverage,
    precision_recall,
    sliced_wasserstein,
)

PROPS = settings(max_examples=25, deadline=None)


def points(seed: int, n: int, d: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale


def ring(k: int = 8, r: float = 2.0) -> torch.Tensor:
    angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    return torch.stack([r * angles.cos(), r * angles.sin()], dim=1)


# --- naive references ------------------------------------------------------------------------------


def ref_mmd(x: np.ndarray, y: np.ndarray, bandwidths: tuple[float, ...]) -> float:
    def k(u: np.ndarray, v: np.ndarray) -> float:
        d2 = float(((u - v) ** 2).sum())
        return sum(math.exp(-d2 / (2 * s * s)) for s in bandwidths)

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def ref_median_distance(x: np.ndarray, y: np.ndarray) -> float:
    pooled = np.concatenate([x, y])
    dists = [
        math.dist(pooled[i], pooled[j]) for i in range(len(pooled)) for j in range(len(pooled)) if i != j
    ]
    return float(torch.tensor(dists, dtype=torch.float64).median())  # lower median, as torch defines it


def ref_knn_radius(x: np.ndarray, i: int, k: int) -> float:
    return sorted(math.dist(x[i], x[j]) for j in range(len(x)) if j != i)[k - 1]


def ref_precision(real: np.ndarray, fake: np.ndarray, k: int) -> float:
    radii = [ref_knn_radius(real, i, k) for i in range(len(real))]
    inside = [any(math.dist(f, real[i]) <= radii[i] for i in range(len(real))) for f in fake]
    return sum(inside) / len(fake)


def ref_frechet_diagonal(mu_a: np.ndarray, var_a: np.ndarray, mu_b: np.ndarray, var_b: np.ndarray) -> float:
    return float(((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum())


# --- sliced Wasserstein ----------------------------------------------------------------------------


def test_swd_1d_equals_exact_w2_from_sorted_values() -> None:
    a, b = points(0, 50, 1), points(1, 50, 1, scale=2.0) + 0.5
    exact = math.sqrt(float(((np.sort(a.numpy()[:, 0]) - np.sort(b.numpy()[:, 0])) ** 2).mean()))
    assert sliced_wasserstein(a, b, projections=7) == pytest.approx(exact, rel=1e-12)


def test_swd_1d_unequal_sizes_matches_linear_quantiles() -> None:
    a, b = points(2, 13, 1), points(3, 40, 1) * 3.0 - 1.0
    q = np.linspace(0.0, 1.0, 40)
    exact = math.sqrt(
        float(((np.quantile(a.numpy()[:, 0], q) - np.quantile(b.numpy()[:, 0], q)) ** 2).mean())
    )
    assert sliced_wasserstein(a, b, projections=5) == pytest.approx(exact, rel=1e-12)
    assert sliced_wasserstein(b, a, projections=5) == pytest.approx(exact, rel=1e-12)


def test_swd_flattens_images_and_is_deterministic_per_seed() -> None:
    a, b = points(4, 16, 3 * 4 * 4).reshape(16, 3, 4, 4), points(5, 16, 48).reshape(16, 3, 4, 4)
    flat = sliced_wasserstein(a.reshape(16, -1), b.reshape(16, -1), seed=3)
    assert sliced_wasserstein(a, b, seed=3) == flat
    assert sliced_wasserstein(a.float(), b.float(), seed=3) == pytest.approx(flat, rel=1e-5)
    assert sliced_wasserstein(a, b, seed=4) != flat


@PROPS
@given(st.integers(0, 10_000), st.integers(2, 40), st.integers(2, 40), st.integers(1, 6))
def test_swd_zero_on_itself_and_symmetric(seed: int, n: int, m: int, d: int) -> None:
    a, b = points(seed, n, d), points(seed + 1, m, d, scale=2.0)
    assert sliced_wasserstein(a, a, projections=32) == 0.0
    assert sliced_wasserstein(a, b, projections=32) == pytest.approx(
        sliced_wasserstein(b, a, projections=32), rel=1e-12, abs=1e-12
    )


@PROPS
@given(st.integers(0, 10_000), st.integers(2, 40), st.integers(1, 6), st.floats(0.01, 10.0))
def test_swd_grows_with_a_shift(seed: int, n: int, d: int, step: float) -> None:
    a = points(seed, n, d)
    shift = points(seed + 7, 1, d)
    shift = shift / shift.norm() * step
    near, far = sliced_wasserstein(a, a + shift), sliced_wasserstein(a, a + 2 * shift)
    assert 0.0 < near < far
    assert far == pytest.approx(2 * near, rel=1e-9)  # a pure shift moves every projection by <shift, dir>


# --- MMD -------------------------------------------------------------------------------------------


def test_mmd_matches_double_loop_reference() -> None:
    a, b = points(10, 6, 3), points(11, 5, 3) + 0.7
    assert mmd_rbf(a, b, bandwidths=(0.3, 1.5)) == pytest.approx(
        ref_mmd(a.numpy(), b.numpy(), (0.3, 1.5)), rel=1e-10, abs=1e-13
    )
    med = ref_median_distance(a.numpy(), b.numpy())
    default = ref_mmd(a.numpy(), b.numpy(), (0.5 * med, med, 2 * med))
    assert mmd_rbf(a, b) == pytest.approx(default, rel=1e-10, abs=1e-13)


@PROPS
@given(st.integers(0, 10_000), st.integers(2, 30), st.integers(1, 5))
def test_mmd_of_identical_sets_is_near_zero(seed: int, n: int, d: int) -> None:
    a = points(seed, n, d)
    # Unbiased estimate on a set against itself: (2/n) * (mean off-diagonal kernel - kernel(0)), in [-6/n, 0].
    value = mmd_rbf(a, a)
    assert -6.0 / n - 1e-12 <= value <= 1e-12


def test_mmd_same_distribution_small_separated_large() -> None:
    a, b = points(20, 200, 2), points(21, 200, 2)
    assert abs(mmd_rbf(a, b)) < 0.05
    assert mmd_rbf(a, b + 10.0) > 1.0


@PROPS
@given(st.integers(0, 10_000), st.integers(2, 20), st.integers(2, 20), st.floats(5.0, 50.0))
def test_mmd_positive_for_separated_sets(seed: int, n: int, m: int, gap: float) -> None:
    a, b = points(seed, n, 2, scale=0.5), points(seed + 1, m, 2, scale=0.5) + gap
    assert mmd_rbf(a, b) > 0.0


# --- mode coverage ---------------------------------------------------------------------------------


@PROPS
@given(st.integers(1, 10), st.floats(0.5, 10.0))
def test_mode_coverage_samples_at_every_centre(per_mode: int, ring_radius: float) -> None:
    centres = ring(8, ring_radius)
    samples = centres.repeat(per_mode, 1)
    assert mode_coverage(samples, centres, radius=0.1) == {"modes_covered": 1.0, "on_mode": 1.0}


@PROPS
@given(st.integers(1, 50), st.integers(0, 7))
def test_mode_coverage_samples_at_one_centre(count: int, which: int) -> None:
    centres = ring()
    samples = centres[which].repeat(count, 1)
    assert mode_coverage(samples, centres, radius=0.1) == {"modes_covered": 1 / 8, "on_mode": 1.0}


def test_mode_coverage_matches_loop_reference() -> None:
    centres = ring()
    samples = points(30, 400, 2, scale=2.5)
    radius, min_fraction = 0.5, 0.02
    nearest = [min(range(8), key=lambda c: math.dist(s, centres[c].tolist())) for s in samples.tolist()]
    on = [math.dist(s, centres[c].tolist()) <= radius for s, c in zip(samples.tolist(), nearest, strict=True)]
    counts = [sum(1 for c, o in zip(nearest, on, strict=True) if o and c == j) for j in range(8)]
    expected = {
        "modes_covered": sum(1 for c in counts if c > 0 and c >= min_fraction * 400) / 8,
        "on_mode": sum(on) / 400,
    }
    assert mode_coverage(samples, centres, radius, min_fraction) == pytest.approx(expected)


def test_mode_coverage_ignores_off_mode_and_sparse_modes() -> None:
    centres = ring()
    far = torch.full((90, 2), 100.0, dtype=torch.float64)
    samples = torch.cat([far, centres[:1].repeat(9, 1), centres[1:2]])  # 9 % on mode 0, 1 % on mode 1
    out = mode_coverage(samples, centres, radius=0.1, min_fraction=0.05)
    assert out == {"modes_covered": 1 / 8, "on_mode": pytest.approx(0.1)}


# --- Fréchet distance ------------------------------------------------------------------------------


def orthogonal_design(mu: list[float], std: list[float]) -> torch.Tensor:
    """4 rows whose sample mean is mu and whose sample covariance is exactly diag(std²)."""
    h = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    mean, scale = torch.tensor(mu, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    return mean + h[:, : len(mu)] * math.sqrt(3 / 4) * scale


def test_frechet_matches_closed_form_for_diagonal_gaussians() -> None:
    mu_a, std_a, mu_b, std_b = [0.0, 1.0, -2.0], [1.0, 0.5, 2.0], [0.5, 1.0, 1.0], [3.0, 0.5, 0.1]
    a, b = orthogonal_design(mu_a, std_a), orthogonal_design(mu_b, std_b)
    assert torch.allclose(torch.cov(a.T), torch.diag(torch.tensor(std_a, dtype=torch.float64) ** 2))
    expected = ref_frechet_diagonal(
        np.array(mu_a), np.array(std_a) ** 2, np.array(mu_b), np.array(std_b) ** 2
    )
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_scipy_sqrtm() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    a = points(40, 300, 5) @ points(41, 5, 5)
    b = points(42, 200, 5) @ points(43, 5, 5) + 0.3
    xa, xb = a.numpy(), b.numpy()
    sa, sb = np.cov(xa, rowvar=False), np.cov(xb, rowvar=False)
    cross = np.real(linalg.sqrtm(sa @ sb))
    expected = float(
        ((xa.mean(0) - xb.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(cross)
    )
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


@PROPS
@given(st.integers(0, 10_000), st.integers(2, 40), st.integers(1, 8), st.floats(0.01, 100.0))
def test_frechet_of_a_set_with_itself_is_zero(seed: int, n: int, d: int, scale: float) -> None:
    a = points(seed, n, d, scale)
    assert frechet_distance(a, a) <= 1e-6 * (1.0 + float(a.var(dim=0).sum()))


def test_frechet_is_the_squared_mean_gap_for_a_shift() -> None:
    a = points(50, 100, 4)
    assert frechet_distance(a, a + 2.0) == pytest.approx(16.0, rel=1e-6)


# --- precision / recall ----------------------------------------------------------------------------


def test_precision_recall_match_loop_reference() -> None:
    real, fake = points(60, 30, 3), points(61, 25, 3) * 1.5 + 0.4
    out = precision_recall(real, fake, k=3)
    assert out["precision"] == pytest.approx(ref_precision(real.numpy(), fake.numpy(), 3))
    assert out["recall"] == pytest.approx(ref_precision(fake.numpy(), real.numpy(), 3))


@PROPS
@given(st.integers(0, 10_000), st.integers(6, 40), st.integers(1, 6), st.integers(1, 5))
def test_precision_recall_identical_sets_are_one(seed: int, n: int, d: int, k: int) -> None:
    a = points(seed, n, d)
    assert precision_recall(a, a.clone(), k=k) == {"precision": 1.0, "recall": 1.0}


@PROPS
@given(st.integers(0, 10_000), st.integers(6, 40), st.integers(6, 40), st.integers(1, 5))
def test_precision_recall_far_apart_sets_are_zero(seed: int, n: int, m: int, k: int) -> None:
    real, fake = points(seed, n, 3), points(seed + 1, m, 3) + 1000.0
    assert precision_recall(real, fake, k=k) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_separate_fidelity_from_diversity() -> None:
    real = points(70, 400, 2)
    collapsed = points(71, 400, 2, scale=0.1)  # good samples, little diversity
    out = precision_recall(real, collapsed, k=3)
    assert out["precision"] > 0.9
    assert out["recall"] < 0.3


# --- input checks ----------------------------------------------------------------------------------


def test_bad_inputs_raise() -> None:
    a, b = points(80, 10, 2), points(81, 10, 3)
    for fn in (sliced_wasserstein, mmd_rbf, frechet_distance, precision_recall):
        with pytest.raises(ValueError, match="dimension"):
            fn(a, b)
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(a, a, k=10)
    with pytest.raises(ValueError, match="at least 2"):
        mmd_rbf(a[:1], a)
    with pytest.raises(ValueError, match="shape"):
        sliced_wasserstein(a[:, 0], a[:, 0])
