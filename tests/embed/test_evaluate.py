"""Student-vs-teacher numbers of the embedding family against naive references."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import spearmanr

from distill.embed.encoders import evenly_spaced
from distill.embed.evaluate import neighbour_recall, pair_indices, pair_spearman


def test_spearman_is_one_for_the_same_space_and_matches_a_pair_loop() -> None:
    torch.manual_seed(0)
    t = torch.randn(12, 5, dtype=torch.float64)
    s = t + 0.3 * torch.randn_like(t)
    assert pair_spearman(t, t) == pytest.approx(1.0)
    assert pair_spearman(t @ torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0], t) == pytest.approx(
        1.0
    )
    cos = torch.nn.functional.cosine_similarity
    pairs = list(itertools.combinations(range(12), 2))
    a = [float(cos(s[i], s[j], dim=0)) for i, j in pairs]
    b = [float(cos(t[i], t[j], dim=0)) for i, j in pairs]
    assert pair_spearman(s, t) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


def test_pair_sample_is_fixed_and_distinct() -> None:
    i, j = pair_indices(50, 100, seed=3)
    assert len(set(zip(i.tolist(), j.tolist(), strict=True))) == 100 and bool((i < j).all())
    assert torch.equal(i, pair_indices(50, 100, seed=3)[0])


def test_neighbour_recall_against_a_loop() -> None:
    torch.manual_seed(1)
    s, t = torch.randn(15, 4), torch.randn(15, 4)
    k = 3

    def top(e: torch.Tensor, q: int) -> set[int]:
        sims = [
            (float(torch.nn.functional.cosine_similarity(e[q], e[j], dim=0)), j) for j in range(15) if j != q
        ]
        return {j for _, j in sorted(sims, reverse=True)[:k]}

    expected = sum(len(top(s, q) & top(t, q)) for q in range(15)) / (k * 15)
    assert neighbour_recall(s, t, k) == pytest.approx(expected)
    assert neighbour_recall(t, t, k) == 1.0


def test_evenly_spaced_blocks() -> None:
    assert evenly_spaced(6, 3) == [0, 2, 5] or evenly_spaced(6, 3) == [0, 3, 5]
    assert evenly_spaced(6, 6) == list(range(6)) and evenly_spaced(6, 1) == [5]
