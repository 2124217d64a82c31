#!/usr/bin/env python
"""Cross-tokenizer distillation: SmolLM2-135M-Instruct into a 6-layer copy speaking its own 4,096-entry BPE.

    python benchmarks/cross_tokenizer.py                                   # 3 seeds, the recipe's 60 steps
    python benchmarks/cross_tokenizer.py --seeds 1 --steps 5               # a smoke run
    python benchmarks/cross_tokenizer.py --summary runs/bench/cross_tokenizer/main/eval.json \
        --markdown docs/benchmarks/cross_tokenizer.md                      # report a finished run

Runs the built-in `smollm2-cross-tokenizer` recipe (methods: ALM + CE, ULD + CE, and SFT on the teacher's
answers, i.e. `seq_kd`, all at equal steps from the same transplanted student) over the seeds; seeds
change the batch order, the student init and its tokenizer are the same. Reported: held-out bits per
byte of the teacher's answers (tokenizer-free), its excess over the teacher's own, and the chunk KL, as
mean [95 % Student-t] over seeds at the last step (no selection); then each KD method minus SFT, paired
by seed, with the interval of the paired differences.
"""

# ruff: noqa: E402 - the OpenMP setting below must precede the first torch import
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from pathlib import Path
from typing import Any

from report_output import emit, interval, seed_values

METRICS = [("bits_per_byte", "bits/byte"), ("excess_bits_per_byte", "over teacher"), ("chunk_kl", "chunk KL")]
BASELINE = "sft on teacher text"


def report(summary: dict[str, Any], wall: float | None) -> list[str]:
    methods: dict[str, Any] = summary["methods"]
    before = summary["before"]
    seeds = summary.get("seeds") or [0]
    lines = [
        f"Seeds {seeds}; {summary['data']['eval_examples']} held-out answers "
        f"({before['bytes']:,} bytes); teacher {before['teacher_bits_per_byte']:.4f} bits/byte"
        + (f"; total wall {wall:.0f} s." if wall is not None else "."),
        "",
        "| student | " + " | ".join(title for _, title in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
        "| untrained (transplanted) | " + " | ".join(f"{before[k]:.4f}" for k, _ in METRICS) + " |",
    ]
    for label, entry in methods.items():
        lines.append(
            f"| {label} | "
            + " | ".join(interval(list(seed_values(entry, k).values())) for k, _ in METRICS)
            + " |"
        )
    if BASELINE in methods:
        lines += ["", f"Paired by seed, minus `{BASELINE}` (negative: the KD method is better):", ""]
        lines += ["| method | bits/byte difference | per seed |", "|---|---|---|"]
        base = seed_values(methods[BASELINE], "bits_per_byte")
        for label, entry in methods.items():
            if label == BASELINE:
                continue
            mine = seed_values(entry, "bits_per_byte")
            diffs = [mine[s] - base[s] for s in sorted(mine) if s in base]
            lines.append(f"| {label} | {interval(diffs)} | {', '.join(f'{d:+.4f}' for d in diffs)} |")
    timing = [
        f"{label}: {sorted(e['train_seconds'] for e in entry.get('seeds', {'0': entry}).values())[0]:.0f} s"
        for label, entry in methods.items()
    ]
    lines += ["", "Fastest training time per seed: " + "; ".join(timing) + "."]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="train.steps (default: the recipe's)")
    p.add_argument("--out", default="runs/bench/cross_tokenizer/main")
    p.add_argument("--summary", type=Path, default=None, help="report this finished run's eval.json instead")
    p.add_argument("--resume", action="store_true", help="keep finished (method, seed) results")
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args()
    wall = None
    if args.summary is not None:
        summary = json.loads(args.summary.read_text(encoding="utf-8"))
    else:
        from distill.pipeline import run_recipe
        from distill.recipe import load_recipe

        recipe = load_recipe("smollm2-cross-tokenizer")
        recipe.seeds, recipe.output_dir = list(range(args.seeds)), args.out
        if args.steps is not None:
            recipe.train.steps = args.steps
        t0 = time.perf_counter()
        summary = run_recipe(recipe, resume=args.resume)
        wall = time.perf_counter() - t0
    emit(report(summary, wall), args.markdown)


if __name__ == "__main__":
    main()
