"""Held-out numbers of a reranker against its teacher, on a fixed candidate pool per query.

Each held-out query's pool is its labelled positive plus the teacher's highest-scored other held-out
passages (a first stage's short list), in passage-id order so that no position favours the positive. On
these pools: how the student orders the candidates against the teacher (Spearman per query, recall of
the teacher's top-k, NDCG@10 with the teacher's top-10 as graded relevance) and against the label (MRR@10
of the positive; ties count against the student). Throughput (pairs scored per second, tokenisation
included) of student and teacher is measured interleaved on the same pairs.
"""

from __future__ import annotations

import time

import torch
from scipy.stats import rankdata

from distill.embed.rerank_scorers import PairScorer

CUTOFF = 10  # of NDCG@10 and MRR@10
THROUGHPUT_PAIRS = 256  # the first held-out pairs, timed for every scorer in every round


def make_pools(teacher: torch.Tensor, positive: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, size)`` passage ids (ascending) per query: the positive and the teacher's `size - 1`
    highest-scored other passages of ``teacher`` ``(Q, P)``; and the positive's column ``(Q,)``."""
    masked = teacher.clone()
    rows = torch.arange(teacher.shape[0])
    masked[rows, positive] = -float("inf")
    others = masked.topk(size - 1, dim=1).indices
    pools = torch.cat([positive.unsqueeze(1), others], dim=1).sort(dim=1).values
    column = (pools == positive.unsqueeze(1)).int().argmax(dim=1)
    return pools, column


def per_query_spearman(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean over queries of the Spearman correlation of the two models' scores of its pool (a constant
    row counts 0): the order a reranker produces, whatever each query's score offset."""
    rs = rankdata(student.double().numpy(), axis=1)
    rt = rankdata(teacher.double().numpy(), axis=1)
    rs, rt = (
        torch.from_numpy(rs - rs.mean(1, keepdims=True)),
        torch.from_numpy(rt - rt.mean(1, keepdims=True)),
    )
    denom = (rs.norm(dim=1) * rt.norm(dim=1)).clamp_min(1e-12)
    rho = (rs * rt).sum(1) / denom
    return float(rho.mean())


def global_spearman(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Spearman correlation over every held-out (query, candidate) pair at once (offsets count)."""
    rs, rt = (torch.from_numpy(rankdata(x.double().flatten().numpy())) for x in (student, teacher))
    rs, rt = rs - rs.mean(), rt - rt.mean()
    return float((rs * rt).sum() / (rs.norm() * rt.norm()).clamp_min(1e-12))


def _order(scores: torch.Tensor) -> torch.Tensor:
    return scores.sort(dim=1, descending=True, stable=True).indices


def recall_of_teacher(student: torch.Tensor, teacher: torch.Tensor, k: int) -> float:
    """Mean over queries of |student's top-k ∩ teacher's top-k| / k."""
    k = min(k, student.shape[1])
    s, t = _order(student)[:, :k], _order(teacher)[:, :k]
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(s, t, strict=True)]
    return sum(hits) / (k * len(hits))


def ndcg_vs_teacher(student: torch.Tensor, teacher: torch.Tensor, cutoff: int = CUTOFF) -> float:
    """Mean NDCG@cutoff of the student's order, the teacher's rank r (0 = best) giving gain
    max(0, cutoff - r): 1 when the student's top `cutoff` is the teacher's, in the teacher's order."""
    n = min(cutoff, student.shape[1])
    gain = torch.zeros(teacher.shape, dtype=torch.float64)
    top = _order(teacher)[:, :n]
    gain.scatter_(1, top, torch.arange(cutoff, cutoff - n, -1, dtype=torch.float64).expand(len(top), -1))
    discount = 1 / torch.log2(torch.arange(n, dtype=torch.float64) + 2)
    dcg = (gain.gather(1, _order(student)[:, :n]) * discount).sum(1)
    ideal = (gain.gather(1, top) * discount).sum(1)
    return float((dcg / ideal).mean())


def mrr_of_positive(scores: torch.Tensor, column: torch.Tensor, cutoff: int = CUTOFF) -> float:
    """Mean reciprocal rank of the labelled positive, 0 beyond `cutoff`; a candidate scored equal to the
    positive ranks above it (a constant scorer gets no credit from the pool's order)."""
    pos = scores.gather(1, column.unsqueeze(1))
    rank = (scores >= pos).sum(1)  # 1-based, ties pessimistic
    rr = torch.where(rank <= cutoff, 1.0 / rank.double(), torch.zeros((), dtype=torch.float64))
    return float(rr.mean())


def pool_metrics(
    student: torch.Tensor, teacher: torch.Tensor, column: torch.Tensor, k: int
) -> dict[str, float]:
    """Every held-out number of one scorer's ``(Q, S)`` pool scores against the teacher's and the label."""
    return {
        "spearman": per_query_spearman(student, teacher),
        "spearman_pairs": global_spearman(student, teacher),
        f"recall_at_{min(k, student.shape[1])}": recall_of_teacher(student, teacher, k),
        "ndcg_at_10": ndcg_vs_teacher(student, teacher),
        "mrr_at_10": mrr_of_positive(student, column),
    }


def score_pools(
    scorer: PairScorer, queries: list[str], passages: list[str], pools: torch.Tensor, batch: int
) -> torch.Tensor:
    """``(Q, S)`` scores of every (query, pool candidate) pair."""
    q = [queries[i] for i in range(pools.shape[0]) for _ in range(pools.shape[1])]
    p = [passages[j] for j in pools.flatten().tolist()]
    return scorer(q, p, batch).view(pools.shape)


def pair_throughput(
    scorers: dict[str, PairScorer], queries: list[str], passages: list[str], batch: int, repeats: int
) -> dict[str, list[float]]:
    """Pairs per second of each scorer, called batch by batch on the same pairs (a reranker's requests),
    `repeats` rounds interleaved (teacher, student, teacher, ...) after one warm-up batch."""
    for fn in scorers.values():
        fn(queries[:batch], passages[:batch], batch)
    out: dict[str, list[float]] = {name: [] for name in scorers}
    for _ in range(repeats):
        for name, fn in scorers.items():
            t0 = time.perf_counter()
            for i in range(0, len(queries), batch):
                fn(queries[i : i + batch], passages[i : i + batch], batch)
            out[name].append(len(queries) / max(time.perf_counter() - t0, 1e-9))
    return out
