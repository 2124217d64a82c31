"""Selection baselines: per-class counts, determinism, herding/k-center/DQ picks against brute force."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from distill.condense.selection import (
    RepeatedRandomSampler,
    dataset_quantization,
    graphcut_bins,
    herding_selection,
    kcenter_selection,
    random_selection,
)


def _blobs(sizes: list[int], dim: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs, one per class, rows interleaved so class rows are not contiguous."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    y = y[torch.randperm(len(y), generator=gen)]
    centres = torch.randn(len(sizes), dim, generator=gen) * 4
    x = centres[y] + torch.randn(len(y), dim, generator=gen)
    return x, y


Selector = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]
SELECTORS: dict[str, Selector] = {
    "random": lambda x, y, ipc, seed: random_selection(y, ipc, seed),
    "herding": lambda x, y, ipc, seed: herding_selection(x, y, ipc),
    "kcenter": lambda x, y, ipc, seed: kcenter_selection(x, y, ipc),
    "dq": lambda x, y, ipc, seed: dataset_quantization(x, y, ipc, bins=3, seed=seed),
}


@pytest.mark.parametrize("name", sorted(SELECTORS))
@pytest.mark.parametrize("ipc", [1, 3, 7])
def test_counts_grouping_and_determinism(name: str, ipc: int) -> None:
    x, y = _blobs([12, 9, 20, 7])
    idx = SELECTORS[name](x, y, ipc, 5)
    assert idx.dtype == torch.long and idx.ndim == 1
    assert len(set(idx.tolist())) == len(idx)  # no row twice
    assert y[idx].tolist() == [c for c in range(4) for _ in range(ipc)]  # grouped by ascending class
    assert torch.equal(idx, SELECTORS[name](x, y, ipc, 5))


def test_seeded_selectors_depend_on_the_seed() -> None:
    x, y = _blobs([30, 30, 30])
    assert not torch.equal(random_selection(y, 5, 0), random_selection(y, 5, 1))
    assert not torch.equal(dataset_quantization(x, y, 5, 5, 0), dataset_quantization(x, y, 5, 5, 1))


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_ipc_above_class_size_is_one_line(name: str) -> None:
    x, y = _blobs([50, 55, 51, 37])
    with pytest.raises(ValueError, match=r"^ipc 50 exceeds the 37 rows of class 3$"):
        SELECTORS[name](x, y, 50, 0)


def test_declared_classes_must_all_be_present() -> None:
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"^ipc 1 exceeds the 0 rows of class 3$"):
        random_selection(y, 1, 0, classes=4)


def test_unlabelled_rows_are_never_picked() -> None:
    y = torch.tensor([-1, 0, -1, 1, 0, 1, -1])
    idx = random_selection(y, 2, 0)
    assert bool((y[idx] >= 0).all()) and len(idx) == 4


def test_herding_first_pick_is_nearest_to_class_mean() -> None:
    x, y = _blobs([25, 18])
    idx = herding_selection(x, y, 1)
    for c, pick in enumerate(idx.tolist()):
        rows = torch.nonzero(y == c).flatten()
        nearest = rows[torch.argmin((x[rows] - x[rows].mean(0)).norm(dim=1))]
        assert pick == int(nearest)


def test_herding_matches_brute_force_running_mean() -> None:
    x, y = _blobs([15], dim=3, seed=4)
    picked: list[int] = []
    for k in range(1, 6):
        best = min(
            (i for i in range(len(x)) if i not in picked),
            key=lambda i: float((x[picked + [i]].mean(0) - x.mean(0)).norm()),
        )
        picked.append(best)
        assert k == len(picked)
    assert herding_selection(x, y, 5).tolist() == picked


def test_kcenter_adds_the_farthest_row() -> None:
    x, y = _blobs([20], dim=2, seed=3)
    first, second, third = kcenter_selection(x, y, 3).tolist()
    assert first == int(torch.argmin((x - x.mean(0)).norm(dim=1)))
    assert second == int(torch.argmax((x - x[first]).norm(dim=1)))
    to_set = torch.minimum((x - x[first]).norm(dim=1), (x - x[second]).norm(dim=1))
    assert third == int(torch.argmax(to_set))


def test_graphcut_bins_partition_the_rows() -> None:
    x, _ = _blobs([23], dim=4)
    bins = graphcut_bins(x, 5)
    sizes = sorted(len(b) for b in bins)
    assert sizes[0] >= 4 and sizes[-1] - sizes[0] <= 1
    assert sorted(torch.cat(bins).tolist()) == list(range(23))
    # The first pick of the first bin is the row with the largest total similarity (the most central).
    unit = torch.nn.functional.normalize(x.double(), dim=1)
    assert int(bins[0][0]) == int(torch.argmax((0.5 + 0.5 * unit @ unit.T).sum(1)))
    with pytest.raises(ValueError, match="bins 24 exceeds the 23 rows"):
        graphcut_bins(x, 24)


@pytest.mark.parametrize("per_bin", [1, 2])
def test_dq_samples_every_bin(per_bin: int) -> None:
    bins = 4
    x, y = _blobs([21, 16, 30], dim=6)
    idx = dataset_quantization(x, y, bins * per_bin, bins=bins, seed=2)
    for c in range(3):
        rows = torch.nonzero(y == c).flatten()
        picked = set(idx[y[idx] == c].tolist())
        for members in graphcut_bins(x[rows], bins):
            assert len(picked & set(rows[members].tolist())) == per_bin


def test_dq_with_fewer_picks_than_bins_uses_distinct_bins() -> None:
    x, y = _blobs([30], dim=4)
    idx = dataset_quantization(x, y, 3, bins=6, seed=0)
    owner = {int(r): k for k, members in enumerate(graphcut_bins(x, 6)) for r in members}
    assert len({owner[int(i)] for i in idx}) == 3


def test_rs2_epochs_are_class_balanced_fresh_and_reproducible() -> None:
    _, y = _blobs([10, 14, 9])
    sampler = RepeatedRandomSampler(y, ipc=3, seed=7)
    e0, e1 = sampler.epoch_indices(0), sampler.epoch_indices(1)
    assert y[e0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(sampler) == 9
    assert not torch.equal(e0, e1)
    assert torch.equal(e1, RepeatedRandomSampler(y, ipc=3, seed=7).epoch_indices(1))  # order-free
    sampler.set_epoch(1)
    assert sorted(sampler) == sorted(e1.tolist())


def test_rs2_without_replacement_sees_a_class_before_repeating() -> None:
    y = torch.zeros(10, dtype=torch.long)
    sampler = RepeatedRandomSampler(y, ipc=4, seed=0)
    stream = torch.cat([sampler.epoch_indices(e) for e in range(5)]).tolist()  # 20 = 2 full cycles
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))


def test_rs2_fraction_and_arguments() -> None:
    _, y = _blobs([10, 20])
    sampler = RepeatedRandomSampler(y, fraction=0.25, seed=0, replacement=True)
    assert sampler.per_class == [2, 5] and len(sampler.epoch_indices(3)) == 7
    with pytest.raises(ValueError, match="exactly one of ipc and fraction"):
        RepeatedRandomSampler(y, ipc=2, fraction=0.5)
    with pytest.raises(ValueError, match="exceeds the 10 rows of class 0"):
        RepeatedRandomSampler(y, ipc=11)
