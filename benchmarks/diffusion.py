#!/usr/bin/env python
"""Diffusion distillation on the 8-Gaussian ring and on digits: do the published orderings hold here?

    python benchmarks/diffusion.py                                   # both recipes, their 3 seeds
    python benchmarks/diffusion.py --datasets ring8 --steps 100      # a smoke run
    python benchmarks/diffusion.py --markdown docs/benchmarks/diffusion.md

Runs the built-in `ring8-diffusion` and `digits-diffusion` recipes (resumable: a killed run continues
with `--resume`, finished (method, seed) pairs are kept). Reported per dataset: every student's sample
quality at the last step (no selection; mean [95 % Student-t] over seeds), beside the teacher sampled
with 1, 2, ... Euler steps and with its reference sampler. Then the orderings, each paired by seed where
both sides have seeds: (a) consistency beats progressive distillation at 1 and at 2 steps; (b) 2 steps
beat 1 step for each method; (c) every distilled student beats the teacher run with the same number of
Euler steps; (d) DMD2 with 5 critic updates per generator update covers more ring modes than with 1
(TTUR); (e) each student's speed-up at equal quality: the fewest teacher Euler steps that match its
score, over its own steps.

Not collected by pytest (it lives outside tests/).
"""

# ruff: noqa: E402 - the OpenMP setting below must precede the first torch import
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import time
from pathlib import Path
from typing import Any

import yaml

from distill.cli_progress import RichProgress
from distill.pipeline import run_recipe
from distill.recipe import parse_recipe, resolve_recipe_path
from report_output import emit, interval, seed_values

RECIPES = {"ring8": "ring8-diffusion", "digits": "digits-diffusion"}
PAIRS = [("cd-1", "pd-1"), ("cd-2", "pd-2")]
STEP_PAIRS = [("cd-2", "cd-1"), ("pd-2", "pd-1")]


def run(dataset: str, steps: int | None, seeds: int, resume: bool) -> tuple[dict[str, Any], float]:
    data: dict[str, Any] = yaml.safe_load(resolve_recipe_path(RECIPES[dataset]).read_text(encoding="utf-8"))
    data["output_dir"] = f"runs/bench/diffusion-{dataset}" + ("-quick" if steps else "")
    data["seeds"] = list(range(seeds))
    if steps:
        data["train"]["steps"] = steps
    t0 = time.perf_counter()
    summary = run_recipe(parse_recipe(data), resume=resume, progress=RichProgress())
    return summary, time.perf_counter() - t0


def _fmt(v: Any, pct: bool) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.1f}" if pct else f"{v:.4g}"


def report(dataset: str, summary: dict[str, Any], wall: float) -> list[str]:
    cols = [c for c in summary["columns"] if c["key"] not in ("samples_per_s",)]
    key = "swd" if dataset == "ring8" else "fid"
    methods: dict[str, Any] = summary["methods"]
    refs: dict[str, Any] = summary["references"]
    lines = [
        f"### {dataset} (`{RECIPES[dataset]}`, seeds {summary.get('seeds') or [0]}, wall {wall:.0f} s)",
        "",
    ]
    lines += ["| sampler | " + " | ".join(c["title"] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for label, ref in refs.items():
        lines.append(
            f"| {label} | " + " | ".join(_fmt(ref.get(c["key"]), c["format"] == "pct") for c in cols) + " |"
        )
    for label, entry in methods.items():
        cells = []
        for c in cols:
            try:
                vals = list(seed_values(entry, c["key"]).values())
            except (KeyError, TypeError):
                cells.append("—")
                continue
            cells.append(interval(vals, digits=1 if c["format"] == "pct" else 4, pct=c["format"] == "pct"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Orderings on {key} (lower is better; differences paired by seed):", ""]
    lines += ["| claim | difference (left minus right) | holds |", "|---|---|---|"]

    def paired(a: str, b: str, k: str) -> tuple[str, bool] | None:
        if a not in methods or b not in methods:
            return None
        va, vb = seed_values(methods[a], k), seed_values(methods[b], k)
        diffs = [va[s] - vb[s] for s in va if s in vb]
        from distill.stats import mean_interval

        mean, low, high = mean_interval(diffs)
        better_lower = k in ("swd", "fid", "mmd")
        holds = (high < 0) if better_lower else (low > 0)
        if high != high:  # one seed
            holds = (mean < 0) if better_lower else (mean > 0)
        return interval(diffs, digits=4, signed=True), holds

    for a, b in PAIRS + STEP_PAIRS:
        got = paired(a, b, key)
        if got:
            lines.append(f"| {a} better than {b} | {got[0]} | {'yes' if got[1] else 'no'} |")
    for label, entry in methods.items():
        steps = int(next(iter(seed_values(entry, "steps").values())))
        teacher = refs.get(f"teacher, {steps} Euler step{'s' if steps > 1 else ''}")
        if teacher is None or key not in teacher:
            continue
        vals = list(seed_values(entry, key).values())
        diffs = [v - teacher[key] for v in vals]
        from distill.stats import mean_interval

        mean, low, high = mean_interval(diffs)
        holds = high < 0 if high == high else mean < 0
        lines.append(f"| {label} better than the teacher with {steps} Euler step(s) | "
                     f"{interval(diffs, digits=4, signed=True)} | {'yes' if holds else 'no'} |")  # fmt: skip
    if dataset == "ring8":
        got = paired("dmd2-1", "dmd2-1-critic1", "modes_covered")
        if got:
            lines.append(
                f"| dmd2 5 critic updates covers more modes than 1 | {got[0]} | {'yes' if got[1] else 'no'} |"
            )
        got = paired("dmd2-1", "dmd2-1-critic1", "on_mode")
        if got:
            lines.append(
                f"| dmd2 5 critic updates puts more samples on a mode than 1 | {got[0]} | {'yes' if got[1] else 'no'} |"
            )
    lines += [
        "",
        "Speed-up at equal quality (teacher Euler steps matching the student's score / its steps):",
        "",
    ]
    lines += ["| student | steps | teacher steps to match (per seed) | speed-up |", "|---|---|---|---|"]
    for label, entry in methods.items():
        match = seed_values_opt(entry, "teacher_steps_to_match")
        steps = int(next(iter(seed_values(entry, "steps").values())))
        known = [m for m in match if m is not None]
        speed = f"{min(known) / steps:.1f}x to {max(known) / steps:.1f}x" if known else "none matched"
        lines.append(f"| {label} | {steps} | {match} | {speed} |")
    return lines


def seed_values_opt(entry: dict[str, Any], key: str) -> list[int | None]:
    seeds = entry.get("seeds") or {"0": entry}
    return [e["after"].get(key) for e in seeds.values()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--steps", type=int, default=None, help="train.steps override (a smoke run)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    lines = ["## Diffusion distillation", ""]
    for dataset in args.datasets:
        summary, wall = run(dataset, args.steps, args.seeds, args.resume)
        lines += report(dataset, summary, wall) + [""]
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
