#!/usr/bin/env python
"""On-policy KD vs logit_kd at equal steps (GKD's exposure-bias ordering), on the quickstart pair.

    python benchmarks/on_policy_quality.py --seeds 0 1 2 --steps 60 --markdown docs/benchmarks/on_policy.md

Runs the built-in recipe `smollm2-on-policy` (SmolLM2-135M-Instruct teacher, 6-layer pruned student,
`on_policy` with lmbda 0.5 and forward KL vs `logit_kd` with forward KL on the teacher's answers) over
the seeds, then reports, at the last step (nothing selected on held-out data), mean [95 % t] over seeds:
KL(teacher‖student) on the teacher's held-out answers, and on the answers each student writes itself to
the held-out prompts (`eval.own_samples`), plus the paired difference per seed.
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

OUT = Path("runs/bench/on_policy_quality")
KEYS = [
    ("kl", "KL on teacher answers"),
    ("own_kl", "KL on own answers"),
    ("reverse_kl", "reverse KL on teacher answers"),
    ("own_reverse_kl", "reverse KL on own answers"),
    ("own_top1_agreement", "top-1 on own answers"),
]


def report(summary: dict[str, Any], steps: int) -> list[str]:
    methods = list(summary["methods"])
    lines = [
        f"`smollm2-on-policy`, {steps} steps, seeds {', '.join(seed_values(summary['methods'][methods[0]], 'kl'))}; "
        "last step; mean [95 % t] over seeds.",
        "",
        "| model | " + " | ".join(title for _, title in KEYS) + " |",
        "|---|" + "--:|" * len(KEYS),
    ]
    before = summary.get("before")
    if before:
        lines.append(
            "| student before training | "
            + " | ".join(f"{before.get(k, float('nan')):.4f}" for k, _ in KEYS)
            + " |"
        )
    for m in methods:
        cells = [interval(list(seed_values(summary["methods"][m], k).values())) for k, _ in KEYS]
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    if len(methods) >= 2:
        a, b = methods[0], methods[1]
        lines += ["", f"Paired difference `{a}` − `{b}` per seed (negative: `{a}` lower):", ""]
        for k, title in KEYS[:4]:
            va, vb = seed_values(summary["methods"][a], k), seed_values(summary["methods"][b], k)
            diffs = [va[s] - vb[s] for s in va]
            lines.append(
                f"- {title}: {interval(diffs, signed=True)} (per seed: "
                + ", ".join(f"{d:+.4f}" for d in diffs)
                + ")"
            )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--report-only", action="store_true", help="render the saved eval.json")
    args = p.parse_args()
    eval_json = OUT / "eval.json"
    if not args.report_only:
        recipe = load_recipe(
            "smollm2-on-policy",
            [
                f"output_dir={OUT}",
                f"seeds={json.dumps(args.seeds)}",
                f"train.steps={args.steps}",
                f"train.warmup_steps={max(1, args.steps // 10)}",
            ],
        )
        run_recipe(recipe)
    emit(report(json.loads(eval_json.read_text()), args.steps), args.markdown)


if __name__ == "__main__":
    main()
