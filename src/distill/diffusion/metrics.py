"""Sample-quality numbers for distilled diffusion students, as pure functions of tensors.

A distilled sampler (fewer steps, one step) is judged by how close its samples are to the teacher's or to
the data, not by a training loss. No single number catches every failure, so this module offers several
that fail differently:

- ``sliced_wasserstein`` and ``mmd_rbf`` compare two point sets directly (toy 2-D data, small images);
- ``mode_coverage`` counts the modes of a known mixture that a student still reaches (mode dropping is
  the classic failure of few-step students);
- ``frechet_distance`` and ``precision_recall`` work on features (e.g. an image encoder's embeddings):
  FD sums up mean and covariance mismatch, precision/recall separate fidelity from diversity.

Everything is torch only (no scipy), deterministic for a given seed, computed in float64 where round-off
matters, and returns plain Python floats so results can go straight into reports.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["frechet_distance", "mmd_rbf", "mode_coverage", "precision_recall", "sliced_wasserstein"]


def _as_points(x: Tensor, name: str) -> Tensor:
    """(N, ...) -> (N, D) float64; images and other (N, C, H, W) inputs are flattened per sample."""
    if x.ndim == 1:
        raise ValueError(f"{name} must have shape (N, D) or (N, ...), got {tuple(x.shape)}")
    x = x.detach().reshape(x.shape[0], -1) if x.ndim > 2 else x.detach()
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return x.to(torch.float64)


def _check_dims(a: Tensor, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"point sets differ in dimension: {a.shape[1]} vs {b.shape[1]}")


def _resample_sorted(sorted_x: Tensor, n: int) -> Tensor:
    """Linearly interpolated quantiles at ``n`` evenly spaced levels in [0, 1], along dim 0."""
    m = sorted_x.shape[0]
    if m == n:
        return sorted_x
    if m == 1:
        return sorted_x.expand(n, *sorted_x.shape[1:])
    pos = torch.linspace(0.0, m - 1, n, dtype=sorted_x.dtype, device=sorted_x.device)
    lo = pos.floor().long().clamp(max=m - 2)
    frac = (pos - lo.to(pos.dtype)).unsqueeze(1)
    return sorted_x[lo] * (1.0 - frac) + sorted_x[lo + 1] * frac


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced W2 distance between point sets (N, D) and (M, D); inputs with more dims are flattened.

    Both sets are projected on ``projections`` random unit directions (drawn from a generator seeded by
    ``seed``, so the same seed gives the same directions); each 1-D W2 compares the sorted projections,
    interpolated to max(N, M) quantiles when N != M. Returns sqrt of the mean squared quantile gap.
    """
    if projections < 1:
        raise ValueError(f"projections must be >= 1, got {projections}")
    x, y = _as_points(a, "a"), _as_points(b, "b")
    _check_dims(x, y)
    y = y.to(x.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=gen, dtype=torch.float64)
    dirs = (dirs / dirs.norm(dim=0, keepdim=True).clamp_min(1e-12)).to(x.device)
    px, py = (x @ dirs).sort(dim=0).values, (y @ dirs).sort(dim=0).values
    n = max(px.shape[0], py.shape[0])
    gap = _resample_sorted(px, n) - _resample_sorted(py, n)
    return float(gap.square().mean().sqrt())


def _dists(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise Euclidean distances computed directly (not via matmul), so equal points give exactly 0."""
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


def _sq_dists(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances, float64, never negative."""
    d = x.square().sum(1, keepdim=True) + y.square().sum(1).unsqueeze(0) - 2.0 * (x @ y.T)
    return d.clamp_min(0.0)


def mmd_rbf(a: Tensor, b: Tensor, bandwidths: tuple[float, ...] | None = None) -> float:
    """Unbiased MMD² between (N, D) and (M, D) with the kernel sum_s exp(-|x - y|² / (2 s²)).

    Default bandwidths: the median pairwise distance of the pooled set times (0.5, 1, 2) (1.0 if that
    median is 0). The unbiased estimate is returned as is: it is centred on the true MMD², so for equal
    distributions it can come out slightly negative. Needs N, M >= 2.
    """
    x, y = _as_points(a, "a"), _as_points(b, "b")
    _check_dims(x, y)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"unbiased MMD needs at least 2 samples per set, got {n} and {m}")
    pooled = torch.cat([x, y.to(x.device)])
    d = _sq_dists(pooled, pooled)
    dxx, dyy, dxy = d[:n, :n], d[n:, n:], d[:n, n:]
    if bandwidths is None:
        off = ~torch.eye(n + m, dtype=torch.bool, device=d.device)
        median = float(d[off].sqrt().median())
        base = median if median > 0 else 1.0
        bandwidths = (0.5 * base, base, 2.0 * base)
    if not bandwidths or any(s <= 0 for s in bandwidths):
        raise ValueError(f"bandwidths must be positive, got {bandwidths}")

    def kernel(d: Tensor) -> Tensor:
        return sum((torch.exp(-d / (2.0 * s * s)) for s in bandwidths), torch.zeros_like(d))

    kxx, kyy, kxy = kernel(dxx), kernel(dyy), kernel(dxy)
    term_xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    term_yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(term_xx + term_yy - 2.0 * kxy.mean())


def mode_coverage(
    samples: Tensor, centers: Tensor, radius: float, min_fraction: float = 0.01
) -> dict[str, float]:
    """How many modes of a known mixture (e.g. 8 Gaussians on a ring) the samples reach.

    Each sample goes to its nearest centre and is "on mode" when within ``radius`` of it. Returns
    ``modes_covered``: fraction of centres holding at least one on-mode sample and at least
    ``min_fraction`` of all samples; ``on_mode``: fraction of samples within ``radius`` of some centre.
    """
    x, c = _as_points(samples, "samples"), _as_points(centers, "centers")
    _check_dims(x, c)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    dist = _dists(x, c.to(x.device))
    nearest, idx = dist.min(dim=1)
    on = nearest <= radius
    counts = torch.bincount(idx[on], minlength=c.shape[0])
    covered = (counts > 0) & (counts >= min_fraction * x.shape[0])
    return {"modes_covered": float(covered.double().mean()), "on_mode": float(on.double().mean())}


def _mean_cov(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance (D, D) of (N, D) rows."""
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {x.shape[0]}")
    mu = x.mean(dim=0)
    xc = x - mu
    return mu, (xc.T @ xc) / (x.shape[0] - 1)


def _psd_sqrt(s: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix; round-off negative eigenvalues become 0."""
    vals, vecs = torch.linalg.eigh((s + s.T) / 2.0)
    return (vecs * vals.clamp_min(0.0).sqrt()) @ vecs.T


def frechet_distance(feat_a: Tensor, feat_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D), in float64.

    |mu_a - mu_b|² + tr(S_a) + tr(S_b) - 2 tr((S_a^½ S_b S_a^½)^½). The cross term comes from the
    eigenvalues of the symmetric PSD product (no scipy, no complex round-off); tiny negative eigenvalues
    are clamped to 0 and the result, which is a squared distance, is floored at 0.
    """
    x, y = _as_points(feat_a, "feat_a"), _as_points(feat_b, "feat_b")
    _check_dims(x, y)
    mu_a, s_a = _mean_cov(x)
    mu_b, s_b = _mean_cov(y.to(x.device))
    root_a = _psd_sqrt(s_a)
    prod = root_a @ s_b @ root_a
    eig = torch.linalg.eigvalsh((prod + prod.T) / 2.0).clamp_min(0.0)
    value = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2.0 * eig.sqrt().sum()
    return max(float(value), 0.0)


_ROWS = 1024  # rows per distance block: memory stays O(_ROWS * N) for feature sets of any size


def _knn_radii(x: Tensor, k: int) -> Tensor:
    """Distance from each row to its k-th nearest other row (self excluded)."""
    blocks = [_dists(x[s : s + _ROWS], x).kthvalue(k + 1, dim=1).values for s in range(0, x.shape[0], _ROWS)]
    return torch.cat(blocks)


def _inside_any_ball(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """For each point: is it within radii[j] of some centres[j]?"""
    blocks = [
        (_dists(points[s : s + _ROWS], centres) <= radii.unsqueeze(0)).any(dim=1)
        for s in range(0, points.shape[0], _ROWS)
    ]
    return torch.cat(blocks)


def precision_recall(real_feat: Tensor, fake_feat: Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) from k-NN balls, in float64.

    Each set's manifold is the union of balls around its points with radius = distance to the k-th
    nearest neighbour in the same set. Precision: fraction of fake samples inside the real manifold
    (fidelity); recall: fraction of real samples inside the fake manifold (diversity). Needs k < N, M.
    """
    real, fake = _as_points(real_feat, "real_feat"), _as_points(fake_feat, "fake_feat")
    _check_dims(real, fake)
    fake = fake.to(real.device)
    if k < 1 or k >= min(real.shape[0], fake.shape[0]):
        raise ValueError(
            f"k must be in [1, min(N, M) - 1], got k={k} for N={real.shape[0]}, M={fake.shape[0]}"
        )
    precision = _inside_any_ball(fake, real, _knn_radii(real, k))
    recall = _inside_any_ball(real, fake, _knn_radii(fake, k))
    return {"precision": float(precision.double().mean()), "recall": float(recall.double().mean())}
