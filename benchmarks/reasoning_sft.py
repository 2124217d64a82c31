#!/usr/bin/env python
"""Verified-filtered SFT vs unfiltered SFT vs REDI pairs at equal steps, on the shipped verifiable tasks.

    python benchmarks/reasoning_sft.py --seeds 0 1 2 --markdown docs/benchmarks/reasoning.md

Runs the built-in recipe `smollm2-reasoning` (SmolLM2-135M-Instruct writes 4 answers per task prompt; the
factory verifies, deduplicates and filters them; a copy of the model trains on the kept answers
(`trace_sft`), on every answer (`unfiltered`), or on (verified, wrong) pairs with REDI (`pairwise`)) over
the seeds. The factory and the held-out split are made once (recipe seed 0); the seeds vary the training
order. Reports held-out answer accuracy at the last step (nothing selected on held-out data), mean [95 %
t] over seeds, and the paired differences per seed.
"""

# ruff: noqa: E402 - the OpenMP setting below must precede the first torch import
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
from pathlib import Path
from typing import Any

from distill.pipeline import run_recipe
from distill.recipe import load_recipe
from report_output import emit, interval, seed_values

OUT = Path("runs/bench/reasoning")


def report(summary: dict[str, Any], steps: int) -> list[str]:
    methods = list(summary["methods"])
    keys = [c["key"] for c in summary["columns"]]
    seeds = seed_values(summary["methods"][methods[0]], "accuracy")
    lines = [
        f"`smollm2-reasoning`, {steps} steps, seeds {', '.join(map(str, seeds))}; last step; mean [95 % t] over "
        "seeds. Accuracy in %, mean length in tokens.",
        "",
        "| model | " + " | ".join(keys) + " |",
        "|---|" + "--:|" * len(keys),
    ]
    before = summary.get("before") or {}
    if before:
        cells = [f"{before[k] * (1 if k == 'mean_output_tokens' else 100):.1f}" for k in keys]
        lines.append("| before training (the teacher itself) | " + " | ".join(cells) + " |")
    for m in methods:
        cells = []
        for k in keys:
            scale = 1.0 if k == "mean_output_tokens" else 100.0
            cells.append(
                interval([v * scale for v in seed_values(summary["methods"][m], k).values()], digits=1)
            )
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences in held-out accuracy (percentage points) per seed:", ""]
    for a, b in [(methods[0], methods[1]), *((m, methods[1]) for m in methods[2:])]:
        va, vb = (
            seed_values(summary["methods"][a], "accuracy"),
            seed_values(summary["methods"][b], "accuracy"),
        )
        diffs = [100 * (va[s] - vb[s]) for s in va]
        lines.append(
            f"- `{a}` − `{b}`: {interval(diffs, digits=1, signed=True)} (per seed: "
            + ", ".join(f"{d:+.1f}" for d in diffs)
            + ")"
        )
    funnel = summary.get("factory", {}).get("funnel", {})
    if funnel:
        lines += [
            "",
            "Factory funnel (training prompts):",
            "",
            "| task | prompts | generated | verified | deduplicated | kept |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for task, c in [*funnel["tasks"].items(), ("total", funnel["total"])]:
            lines.append(
                f"| {task} | {c['prompts']} | {c['generated']} | {c['verified']} | {c['deduplicated']} | {c['kept']} |"
            )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--report-only", action="store_true", help="render the saved eval.json")
    args = p.parse_args()
    if not args.report_only:
        recipe = load_recipe(
            "smollm2-reasoning",
            [f"output_dir={OUT}", f"seeds={json.dumps(args.seeds)}", f"train.steps={args.steps}"],
        )
        run_recipe(recipe)
    emit(report(json.loads((OUT / "eval.json").read_text()), args.steps), args.markdown)


if __name__ == "__main__":
    main()
