"""Student-vs-teacher numbers for sentence encoders, on held-out sentences.

Spearman over pairs asks whether the student orders sentence similarities as the teacher does (what a
retrieval or clustering user relies on), independent of the embedding space (a projection-free student
may live in another basis). Recall@k asks whether the student's nearest neighbours are the teacher's.
Throughput is measured interleaved (teacher, student, teacher, ...) so a noisy machine slows both alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from scipy.stats import spearmanr


@torch.no_grad()
def encode(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    mask: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Embeddings of every row, batch by batch, each batch trimmed to its longest row."""
    out = []
    for i in range(0, ids.shape[0], batch_size):
        m = mask[i : i + batch_size]
        width = int(m.sum(1).max())
        out.append(fn(ids[i : i + batch_size, :width], m[:, :width]).float())
    return torch.cat(out)


def pair_indices(n: int, max_pairs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair i < j, or `max_pairs` of them drawn without replacement (fixed by `seed`)."""
    i, j = torch.triu_indices(n, n, offset=1)
    if i.numel() > max_pairs:
        keep = torch.randperm(i.numel(), generator=torch.Generator().manual_seed(seed))[:max_pairs]
        i, j = i[keep], j[keep]
    return i, j


def pair_spearman(student: torch.Tensor, teacher: torch.Tensor, max_pairs: int = 20000) -> float:
    """Spearman correlation of cosine similarities over held-out pairs (student vs teacher)."""
    i, j = pair_indices(student.shape[0], max_pairs)
    s, t = (torch.nn.functional.normalize(e.double(), dim=-1) for e in (student, teacher))
    rho = spearmanr((s[i] * s[j]).sum(-1).numpy(), (t[i] * t[j]).sum(-1).numpy()).statistic
    return float(rho)


def neighbour_recall(student: torch.Tensor, teacher: torch.Tensor, k: int) -> float:
    """Mean over queries of |student's top-k ∩ teacher's top-k| / k (self excluded), the corpus being the
    held-out sentences themselves."""
    k = min(k, student.shape[0] - 1)
    tops = []
    for e in (student, teacher):
        e = torch.nn.functional.normalize(e.double(), dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        tops.append(sim.topk(k, dim=1).indices)
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(tops[0], tops[1], strict=True)]
    return sum(hits) / (k * len(hits))


def throughput(
    fns: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    ids: torch.Tensor,
    mask: torch.Tensor,
    batch_size: int,
    repeats: int = 3,
) -> dict[str, list[float]]:
    """Sentences per second of each encoder over all rows, `repeats` rounds interleaved; one warm-up."""
    for fn in fns.values():
        encode(fn, ids[:batch_size], mask[:batch_size], batch_size)
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            encode(fn, ids, mask, batch_size)
            out[name].append(ids.shape[0] / (time.perf_counter() - t0))
    return out
