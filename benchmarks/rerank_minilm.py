#!/usr/bin/env python
"""Reranker distillation by Margin-MSE: all-MiniLM-L6-v2 (a bi-encoder teacher) into 3-block students.

    python benchmarks/rerank_minilm.py                            # 3 seeds, the recipe's steps
    python benchmarks/rerank_minilm.py --seeds 1 --steps 10       # a smoke run
    python benchmarks/rerank_minilm.py --markdown docs/benchmarks/rerank.md

Runs the built-in `minilm-rerank` recipe (a 3-block cross-encoder student `cross`, a 3-block bi-encoder
student `bi`, both cut from the teacher's blocks 0, 2, 5 and trained the same way; `bi` first, so the
"before" row is the untrained pruned copy scoring by cosine) over `--seeds` (seeds change the batch
order, the negatives drawn and the cross-encoder head's init). Reported on the held-out
queries (modules never seen in training), mean [95 % Student-t interval] over seeds: Spearman of student
vs teacher scores within each query's candidate pool, recall@5 of the teacher's top 5, NDCG@10 against
the teacher's ranking, MRR@10 of the labelled positive; then the paired per-seed difference cross - bi.
Last, scoring speed side by side: the teacher and the first seed's exported students loaded as a user
would (`SentenceTransformer(path)` for bi-encoders, scoring each batch's distinct queries and passages
once; `CrossEncoder(path).predict` for the cross-encoder) on the same held-out pairs, `--repeats`
rounds interleaved after a warm-up: pairs/s median (min-max) and the per-round ratio to the teacher.
`--resume` keeps finished (method, seed) results. Threads: `--threads` (2).
"""

# ruff: noqa: E402 - the OpenMP setting below must precede the first torch import
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from distill.embed.rerank_data import read_pairs
from distill.paths import resolve_path
from distill.pipeline import run_recipe
from distill.recipe import load_recipe
from distill.recipe_embed import EmbedRecipe
from report_output import emit, interval, seed_values

METRICS = [
    ("spearman", "Spearman vs teacher", False),
    ("recall_at_5", "recall@5 of teacher's top 5 (%)", True),
    ("ndcg_at_10", "NDCG@10 vs teacher", False),
    ("mrr_at_10", "MRR@10 of the positive", False),
]


def per_seed(entry: dict[str, Any], key: str) -> list[float]:
    return list(seed_values(entry, key).values())


def student_folder(run: Path, label: str) -> Path:
    base = run / "methods" / label
    return base / "student" if (base / "student").exists() else sorted(base.glob("seed-*/student"))[0]


def speed_pairs(heldout: str, n: int, per_query: int = 10) -> list[tuple[str, str]]:
    """`n` held-out (query, passage) pairs: query i against held-out passages i * per_query + j (mod the
    count), so a batch holds as many distinct passages as pairs, as a reranker's fresh candidate lists do."""
    pairs = read_pairs(resolve_path(heldout), "data.heldout")
    out = []
    for i, q in enumerate(pairs.queries):
        for j in range(per_query):
            out.append((q, pairs.passages[(i * per_query + j) % len(pairs.passages)]))
    return out[:n]


def speed(
    folders: dict[str, tuple[str, Path]],
    pairs: list[tuple[str, str]],
    repeats: int,
    batch: int,
    max_length: int,
) -> dict[str, list[float]]:
    from sentence_transformers import CrossEncoder, SentenceTransformer

    def bi(model: Any) -> Any:
        model.max_seq_length = max_length  # the teacher's folder says 256; it was distilled at max_length

        def score(chunk: list[tuple[str, str]]) -> torch.Tensor:
            uq, up = list(dict.fromkeys(q for q, _ in chunk)), list(dict.fromkeys(p for _, p in chunk))
            eq = model.encode(uq, batch_size=batch, convert_to_tensor=True, normalize_embeddings=True)
            ep = model.encode(up, batch_size=batch, convert_to_tensor=True, normalize_embeddings=True)
            qi, pi = {t: i for i, t in enumerate(uq)}, {t: i for i, t in enumerate(up)}
            return (eq[[qi[q] for q, _ in chunk]] * ep[[pi[p] for _, p in chunk]]).sum(-1)

        return score

    def cross(model: Any) -> Any:
        return lambda chunk: model.predict(chunk, batch_size=batch, show_progress_bar=False)

    scorers = {
        name: cross(CrossEncoder(str(path), device="cpu"))
        if kind == "cross"
        else bi(SentenceTransformer(str(path), device="cpu"))
        for name, (kind, path) in folders.items()
    }
    for fn in scorers.values():
        fn(pairs[:batch])
    out: dict[str, list[float]] = {name: [] for name in scorers}
    for _ in range(repeats):
        for name, fn in scorers.items():
            t0 = time.perf_counter()
            for i in range(0, len(pairs), batch):
                fn(pairs[i : i + batch])
            out[name].append(len(pairs) / (time.perf_counter() - t0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="train.steps (default: the recipe's)")
    p.add_argument("--repeats", type=int, default=3, help="speed rounds")
    p.add_argument("--speed-pairs", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench/rerank")
    p.add_argument("--resume", action="store_true", help="keep finished (method, seed) results")
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    r = load_recipe("minilm-rerank")
    assert isinstance(r, EmbedRecipe)
    r.seeds, r.output_dir, r.train.threads = seeds, args.out, args.threads
    r.eval.throughput_repeats = 1  # speed is measured below, on the exported folders
    # the bi-encoder first: "before" is then the primary's untrained student, the pruned copy scoring by
    # cosine (informative and cheap; an untrained cross-encoder is a random head)
    cross, bi = r.method, r.baselines[0]
    r.baselines = []
    r.method, r.baselines = bi, [cross]
    if args.steps is not None:
        r.train.steps = args.steps
    if args.resume:
        (r.run_dir() / "recipe.yaml").unlink(missing_ok=True)
    t0 = time.perf_counter()
    s = run_recipe(r, resume=args.resume)
    train_wall = time.perf_counter() - t0
    data = s["data"]["rerank"]
    labels = list(s["methods"])
    lines = [
        f"Seeds {seeds}; {r.train.steps} steps of {r.data.batch_size} queries; training pairs "
        f"{data['train_pairs']} ({data['train_passages']} passages); held-out {data['heldout_queries']} queries, "
        f"each reranking a pool of {data['pool']} held-out passages; run wall {train_wall:.0f} s "
        f"(teacher embedding {s['timing']['prepare_s']:.0f} s, training and evaluation of every seed).",
        "",
        "| scorer | " + " | ".join(title for _, title, _ in METRICS) + " | train s (per seed) |",
        "|---|" + "---|" * (len(METRICS) + 1),
    ]
    before, teacher_mrr = s["before"], s["before"]["teacher_mrr_at_10"]
    lines.append(f"| teacher (6-block bi-encoder) | 1 | 100 | 1 | {teacher_mrr:.3f} | - |")
    if before:
        cells = [f"{(100 if pct else 1) * before[k]:.{2 if pct else 3}f}" for k, _, pct in METRICS]
        lines.append("| untrained pruned copy (3 blocks, bi-encoder) | " + " | ".join(cells) + " | - |")
    for label in labels:
        entry = s["methods"][label]
        cells = [interval(per_seed(entry, k), 2 if pct else 3, pct) for k, _, pct in METRICS]
        train_s = [e["train_seconds"] for e in entry.get("seeds", {"0": entry}).values()]
        lines.append(
            f"| {label} (3 blocks) | " + " | ".join(cells) + f" | {statistics.median(train_s):.0f} |"
        )
    if len(labels) == 2 and len(seeds) > 1:
        b, a = labels  # cross - bi
        lines += ["", f"Paired per-seed difference {a} - {b}, mean [95 % t interval]:", ""]
        lines += ["| " + " | ".join(title for _, title, _ in METRICS) + " |", "|" + "---|" * len(METRICS)]
        diffs = []
        for k, _, pct in METRICS:
            d = [
                x - y for x, y in zip(per_seed(s["methods"][a], k), per_seed(s["methods"][b], k), strict=True)
            ]
            diffs.append(interval(d, 2 if pct else 3, pct, signed=True))
        lines.append("| " + " | ".join(diffs) + " |")
    run = r.run_dir()
    folders = {"teacher (6 blocks)": ("bi", resolve_path(r.teacher.path))}
    for m in r.methods():
        folders[f"{m.display} (3 blocks)"] = (m.student_kind, student_folder(run, m.display))  # type: ignore[attr-defined]
    pairs = speed_pairs(r.data.heldout, args.speed_pairs)
    rates = speed(folders, pairs, args.repeats, r.eval.batch_size, r.data.max_length)
    teacher = rates["teacher (6 blocks)"]
    lines += [
        "",
        f"Scoring speed on {len(pairs)} held-out (query, passage) pairs, batches of {r.eval.batch_size} pairs, "
        f"{args.threads} threads, {args.repeats} interleaved rounds, every scorer truncating at "
        f"{r.data.max_length} tokens (a text for bi-encoders, a pair for the cross-encoder); bi-encoders through "
        "`SentenceTransformer.encode` (each batch's distinct queries and passages once), the cross-encoder "
        "through `CrossEncoder.predict`: pairs/s median (min-max); speed-up = scorer / teacher per round.",
        "",
        "| scorer | pairs/s | speed-up vs teacher |",
        "|---|---|---|",
    ]
    for name, values in rates.items():
        ratio = [v / t for v, t in zip(values, teacher, strict=True)]
        lines.append(
            f"| {name} | {statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f}) "
            f"| {statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f}) |"
        )
    lines += ["", f"Total wall {time.perf_counter() - t0:.0f} s."]
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
