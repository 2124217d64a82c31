"""Coreset selection baselines for dataset distillation: which real rows to keep, `ipc` per class.

Every distilled set has to beat these, and they cost nothing to run, so a distillation result is only
meaningful next to them (DD-Ranking's "improvement over random" is measured against `random_selection`).
Each selector returns int64 row indices into the training set, grouped by class in ascending class order,
and is deterministic (seeded ones by `seed`, the greedy ones by construction, ties to the lowest row).
Rows with a negative label (unlabelled) are never picked. Embeddings are whatever feature space the
caller trusts: flattened pixels, or a trained network's penultimate features.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

__all__ = [
    "RepeatedRandomSampler",
    "dataset_quantization",
    "graphcut_bins",
    "herding_selection",
    "kcenter_selection",
    "random_selection",
]


def _class_rows(y: torch.Tensor, ipc: int, classes: int | None) -> list[tuple[int, torch.Tensor]]:
    """(class, its row indices) for each class, checking that every class holds at least `ipc` rows.

    With `classes` given, every class in range(classes) is required, so a class missing from `y` fails
    loudly instead of silently getting no examples."""
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (got shape {tuple(y.shape)})")
    if int(ipc) < 1:
        raise ValueError(f"ipc must be >= 1 (got {ipc})")
    y = y.detach().cpu().long()
    present = sorted(torch.unique(y[y >= 0]).tolist())
    wanted = list(range(int(classes))) if classes is not None else present
    out = []
    for c in wanted:
        rows = torch.nonzero(y == c).flatten()
        if len(rows) < ipc:
            raise ValueError(f"ipc {ipc} exceeds the {len(rows)} rows of class {c}")
        out.append((int(c), rows))
    return out


def _check_embeddings(embeddings: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if embeddings.ndim < 2 or len(embeddings) != len(y):
        raise ValueError(f"embeddings {tuple(embeddings.shape)} must be (N, D...) with N = {len(y)} labels")
    return embeddings.detach().cpu().flatten(1).double()


def _mix(*keys: object) -> int:
    """A 63-bit generator seed from `keys`, stable across processes (unlike `hash` of a str)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts).long() if parts else torch.zeros(0, dtype=torch.long)


def random_selection(y: torch.Tensor, ipc: int, seed: int, *, classes: int | None = None) -> torch.Tensor:
    """`ipc` rows drawn uniformly without replacement from each class: the baseline every distillation
    method must beat (DD-Ranking's "rdm" set). Classes draw from one generator in ascending order."""
    gen = torch.Generator().manual_seed(int(seed))
    parts = []
    for _, rows in _class_rows(y, ipc, classes):
        parts.append(rows[torch.randperm(len(rows), generator=gen)[:ipc]])
    return _cat(parts)


def herding_selection(
    embeddings: torch.Tensor, y: torch.Tensor, ipc: int, *, classes: int | None = None
) -> torch.Tensor:
    """Herding (Welling 2009, as used for exemplars by Rebuffi et al. 2017): per class, greedily add the
    row that keeps the running mean of the picked embeddings closest to the class mean.

    Why: the first k picks approximate the class mean at rate O(1/k), much faster than random rows, which
    is exactly what distribution-matching distillation tries to preserve. The first pick is the row
    nearest the class mean; rows are picked without replacement."""
    emb = _check_embeddings(embeddings, y)
    parts = []
    for _, rows in _class_rows(y, ipc, classes):
        feats = emb[rows]
        mu = feats.mean(0)
        running = torch.zeros_like(mu)
        free = torch.ones(len(rows), dtype=torch.bool)
        picked = []
        for k in range(1, ipc + 1):
            # Mean after adding candidate x: (running + x) / k; distance to mu for every candidate.
            dist = ((running + feats) / k - mu).pow(2).sum(1)
            dist[~free] = float("inf")
            i = int(torch.argmin(dist))
            picked.append(i)
            free[i] = False
            running += feats[i]
        parts.append(rows[torch.tensor(picked, dtype=torch.long)])
    return _cat(parts)


def kcenter_selection(
    embeddings: torch.Tensor, y: torch.Tensor, ipc: int, *, classes: int | None = None
) -> torch.Tensor:
    """Greedy k-center (Sener & Savarese 2018) per class: start at the row nearest the class mean, then
    repeatedly add the row farthest from every picked row.

    Why: it minimises the largest distance from any real row to its nearest pick, so it covers the
    class's modes and outliers, the opposite bias to herding (which hugs the mean)."""
    emb = _check_embeddings(embeddings, y)
    parts = []
    for _, rows in _class_rows(y, ipc, classes):
        feats = emb[rows]
        first = int(torch.argmin((feats - feats.mean(0)).pow(2).sum(1)))
        picked = [first]
        nearest = (feats - feats[first]).pow(2).sum(1)
        for _ in range(ipc - 1):
            nearest[torch.tensor(picked)] = -1.0  # never re-pick (identical rows have distance 0)
            i = int(torch.argmax(nearest))
            picked.append(i)
            nearest = torch.minimum(nearest, (feats - feats[i]).pow(2).sum(1))
        parts.append(rows[torch.tensor(picked, dtype=torch.long)])
    return _cat(parts)


def _cosine_kernel(feats: torch.Tensor) -> torch.Tensor:
    """Cosine similarity mapped to [0, 1] (0.5 + 0.5 cos), so GraphCut's coverage term is non-negative."""
    unit = F.normalize(feats, dim=1)
    return 0.5 + 0.5 * (unit @ unit.T)


def graphcut_bins(embeddings: torch.Tensor, bins: int, lam: float = 1.0) -> list[torch.Tensor]:
    """Partition the rows of one class into `bins` non-overlapping bins (sizes differ by at most one).

    Bin k is filled greedily from the rows no earlier bin took, maximising the GraphCut gain on cosine
    similarity, gain(x | S) = lam * sum_{i in R} s(i, x) - 2 * sum_{j in S} s(j, x), where R is the rows
    still unassigned and S the bin so far: the first term favours representative rows, the second
    penalises redundancy with the bin. Early bins hold the most central rows, later ones the periphery
    (Zhou et al. 2023, Dataset Quantization, Sec. 3). Returns row positions into `embeddings`."""
    n = len(embeddings)
    if bins < 1:
        raise ValueError(f"bins must be >= 1 (got {bins})")
    if bins > n:
        raise ValueError(f"bins {bins} exceeds the {n} rows to partition")
    sim = _cosine_kernel(embeddings.detach().cpu().flatten(1).double())
    sizes = [n // bins + (1 if k < n % bins else 0) for k in range(bins)]
    remaining = torch.ones(n, dtype=torch.bool)
    out = []
    for size in sizes:
        gain = lam * sim[:, remaining].sum(1)  # coverage of the rows still unassigned
        gain[~remaining] = -float("inf")
        members = []
        for _ in range(size):
            i = int(torch.argmax(gain))
            members.append(i)
            gain -= 2.0 * sim[i]
            gain[i] = -float("inf")
        idx = torch.tensor(members, dtype=torch.long)
        remaining[idx] = False
        out.append(idx)
    return out


def _spread(total: int, capacity: list[int], gen: torch.Generator) -> list[int]:
    """Split `total` picks over bins as evenly as their capacities allow; leftover single picks go to
    bins chosen at random, so no bin (e.g. the central first one) is systematically favoured."""
    quota = [0] * len(capacity)
    while (left := total - sum(quota)) > 0:
        open_bins = [k for k, cap in enumerate(capacity) if quota[k] < cap]
        if left >= len(open_bins):
            for k in open_bins:
                quota[k] += 1
        else:
            for j in torch.randperm(len(open_bins), generator=gen)[:left].tolist():
                quota[open_bins[j]] += 1
    return quota


def dataset_quantization(
    embeddings: torch.Tensor,
    y: torch.Tensor,
    ipc: int,
    bins: int = 10,
    seed: int = 0,
    *,
    classes: int | None = None,
) -> torch.Tensor:
    """Dataset Quantization (Zhou et al. 2023, ICCV), simplified: per class, `graphcut_bins` splits the
    rows into `bins` GraphCut bins, then rows are sampled uniformly from every bin to fill `ipc`.

    Why bins: a single greedy submodular pass over-samples the dense centre of the class; sampling from
    each bin keeps both central and peripheral rows, so the subset stays diverse at any budget. With
    ipc >= bins every bin contributes; with ipc < bins the picks come from `ipc` distinct random bins.

    Simplifications (say so when reporting): selection runs on the given embeddings per class (the paper
    bins the whole set with a pretrained feature extractor), the bins hold all rows with sizes differing
    by one (the paper drops the remainder), and the paper's patch-dropping and MAE reconstruction of the
    stored images are not done: the selected rows are kept as they are."""
    emb = _check_embeddings(embeddings, y)
    gen = torch.Generator().manual_seed(int(seed))
    parts = []
    for _, rows in _class_rows(y, ipc, classes):
        class_bins = graphcut_bins(emb[rows], min(bins, len(rows)))
        quota = _spread(ipc, [len(b) for b in class_bins], gen)
        for members, q in zip(class_bins, quota, strict=True):
            if q:
                parts.append(rows[members[torch.randperm(len(members), generator=gen)[:q]]])
    return _cat(parts)


class RepeatedRandomSampler(torch.utils.data.Sampler[int]):
    """Repeated Sampling of Random Subsets (RS2, Okanovic et al. 2023): every epoch trains on a fresh
    class-balanced random subset instead of one fixed subset.

    Why: at the same per-epoch budget, seeing different rows each epoch covers far more of the data than
    any static coreset, and RS2 beats most selection methods at matched time. Give exactly one of `ipc`
    (rows per class per epoch) or `fraction` (round(fraction * class size), at least 1, per class).
    Without replacement (RS2's default variant), each class walks through its own reshuffled permutations,
    so no row repeats before the whole class has been seen. `epoch_indices(e)` depends only on
    (seed, e), never on call order; as a torch Sampler it yields the current epoch (see `set_epoch`)
    shuffled."""

    def __init__(
        self,
        y: torch.Tensor,
        *,
        ipc: int | None = None,
        fraction: float | None = None,
        seed: int = 0,
        replacement: bool = False,
    ) -> None:
        if (ipc is None) == (fraction is None):
            raise ValueError("give exactly one of ipc and fraction")
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1] (got {fraction})")
        groups = _class_rows(y, 1 if ipc is None else ipc, None)
        self.rows = [rows for _, rows in groups]
        self.per_class = [
            int(ipc) if ipc is not None else max(1, round(float(fraction or 0) * len(rows)))
            for rows in self.rows
        ]
        self.seed, self.replacement, self.epoch = int(seed), bool(replacement), 0

    def _perm(self, c: int, cycle: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_mix("rs2", self.seed, c, cycle))
        return torch.randperm(len(self.rows[c]), generator=gen)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This epoch's subset: row indices grouped by class in ascending class order."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0 (got {epoch})")
        parts = []
        for c, (rows, k) in enumerate(zip(self.rows, self.per_class, strict=True)):
            n = len(rows)
            if self.replacement:  # an independent subset each epoch
                parts.append(rows[self._perm(c, epoch)[:k]])
                continue
            # Positions [epoch * k, (epoch + 1) * k) of the endless stream of per-cycle permutations.
            first, last = divmod(epoch * k, n)[0], divmod((epoch + 1) * k - 1, n)[0]
            stream = torch.cat([self._perm(c, cycle) for cycle in range(first, last + 1)])
            start = epoch * k - first * n
            parts.append(rows[stream[start : start + k]])
        return _cat(parts)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        idx = self.epoch_indices(self.epoch)
        gen = torch.Generator().manual_seed(_mix("order", self.seed, self.epoch))
        return iter(idx[torch.randperm(len(idx), generator=gen)].tolist())

    def __len__(self) -> int:
        return sum(self.per_class)
