"""Which verified samples the factory keeps: correct ones, deduplicated, then filtered; every other
sample gets the reason it was dropped ("verify: wrong", "dedup: near", "filter: unfinished", ...), and the
funnel counts each stage per task."""

from __future__ import annotations

from collections import Counter
from typing import Any

from distill.configs.factory import DedupConfig, FilterConfig
from distill.reasoning.dedup import deduplicate
from distill.reasoning.verifiers import split_rationale

KEPT = "kept"
STAGES = ("prompts", "generated", "verified", "deduplicated", "kept")


def filter_reason(text: str, finished: bool, filters: FilterConfig) -> str | None:
    """Why a sample fails the filters (None: it passes)."""
    if filters.require_finished and not finished:
        return "unfinished"
    if filters.require_answer and split_rationale(text)[1] is None:
        return "no answer line"
    if filters.min_chars is not None and len(text) < filters.min_chars:
        return "too short"
    if filters.max_chars is not None and len(text) > filters.max_chars:
        return "too long"
    return None


def select_samples(rows: list[dict[str, Any]], dedup: DedupConfig, filters: FilterConfig) -> list[str]:
    """Per verified row (keys text, finished, correct, reason, index), KEPT or why it was dropped.
    Deduplication runs on the correct samples, those that pass the filters first (then in row order), so
    a duplicate pair keeps the copy that can be kept."""
    status: list[str | None] = [None if r["correct"] else f"verify: {r['reason']}" for r in rows]
    correct = [k for k, s in enumerate(status) if s is None]
    failed = {k: filter_reason(rows[k]["text"], rows[k]["finished"], filters) for k in correct}
    order = sorted(correct, key=lambda k: (failed[k] is not None, k))
    result = deduplicate(
        [rows[k]["text"] for k in order],
        exact=dedup.exact,
        near_threshold=dedup.near_threshold,
        ngram=dedup.ngram,
        groups=[rows[k]["index"] for k in order] if dedup.scope == "prompt" else None,
        method="pairwise" if dedup.scope == "prompt" else "lsh",
    )
    for pos, (why, _) in result.dropped.items():
        status[order[pos]] = f"dedup: {why}"
    for k in correct:
        if status[k] is None:
            reason = failed[k]
            status[k] = KEPT if reason is None else f"filter: {reason}"
    return [s or KEPT for s in status]


def funnel(
    rows: list[dict[str, Any]], status: list[str], prompts_per_task: dict[str, int]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(counts, drops), each {"total": ..., "tasks": {task: ...}}: the funnel {prompts, generated, verified (correct),
    deduplicated (correct after dedup), kept (after filters)} and the count of each drop reason."""
    counts: dict[str, Counter[str]] = {t: Counter({s: 0 for s in STAGES}) for t in prompts_per_task}
    drops: dict[str, Counter[str]] = {t: Counter() for t in prompts_per_task}
    for task, n in prompts_per_task.items():
        counts[task]["prompts"] = n
    for row, s in zip(rows, status, strict=True):
        c = counts[row["task"]]
        c["generated"] += 1
        c["verified"] += not s.startswith("verify:")
        c["deduplicated"] += s == KEPT or s.startswith("filter:")
        c["kept"] += s == KEPT
        if s != KEPT:
            drops[row["task"]][s] += 1
    total: Counter[str] = Counter({s: 0 for s in STAGES})
    total_drops: Counter[str] = Counter()
    for task in prompts_per_task:
        total.update(counts[task])
        total_drops.update(drops[task])
    return (
        {
            "total": {s: total[s] for s in STAGES},
            "tasks": {t: {s: counts[t][s] for s in STAGES} for t in sorted(counts)},
        },
        {
            "total": dict(sorted(total_drops.items())),
            "tasks": {t: dict(sorted(drops[t].items())) for t in sorted(drops)},
        },
    )
