#!/usr/bin/env python
"""Sentence-embedding distillation: all-MiniLM-L6-v2 into students with half and a third of its blocks.

    python benchmarks/embed_minilm.py                          # 3 seeds, the recipe's 300 steps
    python benchmarks/embed_minilm.py --seeds 1 --steps 30     # a smoke run
    python benchmarks/embed_minilm.py --markdown docs/benchmarks/embed.md

Runs the built-in `minilm-embed` recipe (3 of 6 blocks: 0, 2, 5; methods mse, cosine+similarity,
cosine+similarity+relations) over `--seeds`, then `mse` with a 2-block student (0, 5), first seed only;
`--baselines cosine+similarity` keeps only that baseline, `--resume` keeps finished (method, seed) results.
Reported: held-out Spearman of student vs teacher similarities and recall@10 of the teacher's
neighbours, before training (the pruned copy) and after, mean [95 % Student-t] over seeds (seeds change
the batch order; the init is the same pruned copy). Last, encode speed side by side: the teacher and each
exported student loaded by sentence-transformers (`SentenceTransformer(path).encode`, the path a user
takes) on the held-out sentences, interleaved, `--repeats` rounds after a warm-up, median (min-max) and
the per-round ratio to the teacher. Threads: `--threads` (2).
"""

# ruff: noqa: E402 - the OpenMP setting below must precede the first torch import
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import time
from pathlib import Path

import torch

from distill.embed.text import read_sentences
from distill.paths import resolve_path
from distill.pipeline import run_recipe
from distill.recipe import load_recipe
from distill.recipe_embed import EmbedRecipe
from report_output import emit, interval, seed_values


def recipe(
    seeds: list[int], steps: int | None, out: str, layers: list[int] | None, labels: list[str] | None
) -> EmbedRecipe:
    r = load_recipe("minilm-embed")
    assert isinstance(r, EmbedRecipe)
    r.seeds, r.output_dir = seeds, out
    if labels is not None:
        r.baselines = [b for b in r.baselines if b.display in labels]
    if steps is not None:
        r.train.steps = steps
    if layers is not None:  # the smaller student: the best method of the 3-block run (mse), one seed
        r.student.num_layers, r.student.layers = None, layers
        mse = next(m for m in r.methods() if m.display == "mse")
        r.baselines = []
        r.method, r.seeds = mse, seeds[:1]
    r.eval.throughput_repeats = 1
    return r


def student_folders(run: Path, label: str) -> list[Path]:
    base = run / "methods" / label
    return [base / "student"] if (base / "student").exists() else sorted(base.glob("seed-*/student"))


def speed(folders: dict[str, Path], sentences: list[str], repeats: int, batch: int) -> dict[str, list[float]]:
    from sentence_transformers import SentenceTransformer

    models = {name: SentenceTransformer(str(path), device="cpu") for name, path in folders.items()}
    for m in models.values():
        m.encode(sentences[:batch], batch_size=batch)
    out: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            m.encode(sentences, batch_size=batch)
            out[name].append(len(sentences) / (time.perf_counter() - t0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="train.steps (default: the recipe's)")
    p.add_argument("--repeats", type=int, default=7, help="speed rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--baselines", nargs="*", default=None, help="keep only these baseline labels")
    p.add_argument("--resume", action="store_true", help="keep finished (method, seed) results")
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    runs = {
        "3 of 6 blocks (0, 2, 5)": recipe(seeds, args.steps, "runs/bench/embed-3", None, args.baselines),
        "2 of 6 blocks (0, 5)": recipe(seeds, args.steps, "runs/bench/embed-2", [0, 5], args.baselines),
    }
    if args.resume:  # finished (method, seed) results are kept; the run's recipe may have fewer baselines
        for r in runs.values():
            (r.run_dir() / "recipe.yaml").unlink(missing_ok=True)
    summaries = {name: run_recipe(r, resume=args.resume) for name, r in runs.items()}
    lines = [
        f"Seeds {seeds}; {next(iter(runs.values())).train.steps} steps; total wall "
        f"{time.perf_counter() - t0:.0f} s (training and evaluation).",
        "",
        "| student | method | Spearman vs teacher | recall@10 (%) | train s (per seed) |",
        "|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        before = s["before"]
        lines.append(
            f"| {name} | untrained pruned copy | {before['spearman']:.4f} | {100 * before['recall_at_10']:.2f} | - |"
        )
        for label, entry in s["methods"].items():
            train_s = (
                [e["train_seconds"] for e in entry["seeds"].values()]
                if "seeds" in entry
                else [entry["train_seconds"]]
            )
            lines.append(
                f"| {name} | {label} | {interval(list(seed_values(entry, 'spearman').values()))} "
                f"| {interval(list(seed_values(entry, 'recall_at_10').values()), 2, pct=True)} | {statistics.median(train_s):.0f} |"
            )
    r3 = next(iter(runs.values()))
    held = read_sentences(resolve_path(r3.data.heldout), r3.data.field, "data.heldout")
    folders = {"teacher (6 blocks)": resolve_path(r3.teacher.path)}
    for name, r in runs.items():
        folders[f"student, {name}"] = student_folders(r.run_dir(), r.method.display)[0]
    rates = speed(folders, held, args.repeats, r3.eval.batch_size)
    teacher = rates["teacher (6 blocks)"]
    lines += [
        "",
        f"Encode speed, `SentenceTransformer(path).encode` on the {len(held)} held-out sentences, batch "
        f"{r3.eval.batch_size}, {args.threads} threads, {args.repeats} interleaved rounds: sentences/s median "
        "(min-max); speed-up = student / teacher per round, median (min-max).",
        "",
        "| encoder | sentences/s | speed-up vs teacher |",
        "|---|---|---|",
    ]
    for name, values in rates.items():
        ratio = [v / t for v, t in zip(values, teacher, strict=True)]
        lines.append(
            f"| {name} | {statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f}) "
            f"| {statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f}) |"
        )
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
