"""Classifier KD on sklearn digits: is Hinton's data-efficiency ordering there, and does DKD beat KD?

    python benchmarks/classifier_digits.py                  # 5 seeds, the recipe's steps
    python benchmarks/classifier_digits.py --seeds 0 1 --steps 100 --markdown runs/bench/quick.md

Runs the built-in `digits-kd` recipe (CNN teacher trained once on every training label, MLP student,
methods kd / dkd / ce) three times: `data.label_fraction` 0.05 and 1.0, and once more at 0.05 with
`data.unlabelled=true` for kd and ce (KD also trains on the unlabelled training images with the teacher's
soft labels, SSLD-style; ce ignores rows without a label). Output: `runs/bench/classifier-digits-<fraction>`
and `runs/bench/classifier-digits-0.05-unlabelled`.

Reported: test accuracy of the student at the final step ("last") and of the checkpoint with the best
validation accuracy ("best on validation"; validation rows are carved from training, the test split is
never used to choose anything), as mean ± 95 % Student-t half-width over seeds; paired differences
(KD - CE, DKD - KD, ...) computed per seed and then summarised the same way; and the difference of the
KD - CE gap at 5 % and at 100 % labels, paired by seed. Not collected by pytest (it lives outside tests/).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from distill.pipeline import run_recipe
from distill.recipe import load_recipe
from distill.stats import mean_interval

FRACTIONS = (0.05, 1.0)
METRICS = (("accuracy", "last"), ("best_accuracy", "best on validation"))


def run_dir(fraction: float, unlabelled: bool) -> str:
    return f"runs/bench/classifier-digits-{fraction}" + ("-unlabelled" if unlabelled else "")


def run_one(fraction: float, unlabelled: bool, seeds: list[int], steps: int | None) -> dict[str, Any]:
    """One recipe run; returns the pipeline's summary (also written to <run dir>/eval.json)."""
    overrides = [
        f"data.label_fraction={fraction}",
        f"output_dir={run_dir(fraction, unlabelled)}",
        f"seeds={seeds}",
    ]
    if unlabelled:
        overrides += ["data.unlabelled=true", "baselines=[{name: ce}]"]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    recipe = load_recipe("digits-kd", overrides)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    t0 = time.perf_counter()
    summary = run_recipe(recipe)
    summary["bench_wall_s"] = time.perf_counter() - t0
    print(f"  {run_dir(fraction, unlabelled)}: {summary['bench_wall_s']:.0f} s", flush=True)
    return summary


def per_seed(summary: dict[str, Any], label: str, metric: str) -> dict[int, float]:
    """{seed: metric} for one method; a one-seed run keeps its numbers in the entry itself."""
    entry = summary["methods"][label]
    if "seeds" not in entry:
        seeds = summary.get("seeds") or [entry.get("seed", 0)]
        return {int(seeds[0]): float(entry["after"].get(metric, math.nan))}
    return {int(s): float(e["after"].get(metric, math.nan)) for s, e in entry["seeds"].items()}


def pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:.2f}"


def mean_pm(values: list[float]) -> str:
    """'mean ± half-width' in percent (the half-width of the 95 % t interval; n/a with one seed)."""
    mean, low, high = mean_interval(values)
    if math.isnan(low):
        return f"{pct(mean)} ± n/a"
    return f"{pct(mean)} ± {100 * (high - low) / 2:.2f}"


def diff_cell(a: dict[int, float], b: dict[int, float]) -> tuple[str, str]:
    """Paired difference a - b over the seeds both have: 'mean [low, high]' in points, and a verdict."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    mean, low, high = mean_interval(d)
    if math.isnan(low):
        return f"{100 * mean:+.2f} [n/a] (n={len(d)})", "n/a"
    verdict = (
        "> 0" if low > 0 else "< 0" if high < 0 else "= 0 on every seed" if low == high else "includes 0"
    )
    return f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] (n={len(d)})", verdict


def report(runs: dict[str, dict[str, Any]], seeds: list[int], steps: int | None, wall: float) -> str:
    lines = [
        f"Seeds {seeds}; student steps {steps or 'from the recipe'}. Accuracies in %, mean ± 95 % "
        "Student-t half-width over seeds. 'last' = the student at the final training step; 'best on "
        "validation' = the checkpoint with the highest validation accuracy (validation rows carved from "
        "training); the test split is never used for selection.",
        "",
        "Teacher (CNN, trained on every training label, test accuracy): "
        + ", ".join(
            f"{name}: {pct(s['references']['teacher']['accuracy'])}"
            for name, s in runs.items()
            if s.get("references", {}).get("teacher")
        ),
        "",
        "| run | labelled rows | method | test acc. (last) | test acc. (best on validation) |",
        "|---|---|---|---|---|",
    ]
    for name, s in runs.items():
        labelled = s["data"]["classifier"]["labelled_rows"]
        for label in s["methods"]:
            cells = [mean_pm(list(per_seed(s, label, m).values())) for m, _ in METRICS]
            lines.append(f"| {name} | {labelled} | {label} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "Paired differences over seeds, in accuracy points: mean [95 % t interval] of the per-seed "
        "differences (same seed = same student init and batch order).",
        "",
        "| comparison | metric | difference | interval vs 0 |",
        "|---|---|---|---|",
    ]
    pairs: list[tuple[str, str, str, str, str]] = []
    for frac in FRACTIONS:
        name = str(frac)
        if name in runs:
            pairs += [(f"KD - CE @ {name}", name, "kd", name, "ce")]
            pairs += [(f"DKD - KD @ {name}", name, "dkd", name, "kd")]
            pairs += [(f"DKD - CE @ {name}", name, "dkd", name, "ce")]
    unl = "0.05-unlabelled"
    if unl in runs and "0.05" in runs:
        pairs += [
            ("KD(unlabelled) - CE @ 0.05", unl, "kd", "0.05", "ce"),
            ("KD(unlabelled) - KD(labelled only) @ 0.05", unl, "kd", "0.05", "kd"),
            ("CE(unlabelled run) - CE @ 0.05 (should be 0)", unl, "ce", "0.05", "ce"),
        ]
    for title, ra, la, rb, lb in pairs:
        for metric, mname in METRICS:
            cell, verdict = diff_cell(per_seed(runs[ra], la, metric), per_seed(runs[rb], lb, metric))
            lines.append(f"| {title} | {mname} | {cell} | {verdict} |")
    if "0.05" in runs and "1.0" in runs:
        lines += [
            "",
            "Is the KD - CE gap larger with 5 % of the labels than with all of them? Per seed: "
            "(KD - CE)@0.05 - (KD - CE)@1.0; > 0 means the gap shrinks as labels grow.",
            "",
            "| metric | gap @ 0.05 | gap @ 1.0 | difference of gaps | interval vs 0 |",
            "|---|---|---|---|---|",
        ]
        for metric, mname in METRICS:
            gaps = {}
            for name in ("0.05", "1.0"):
                kd, ce = per_seed(runs[name], "kd", metric), per_seed(runs[name], "ce", metric)
                gaps[name] = {s: kd[s] - ce[s] for s in set(kd) & set(ce)}
            cell, verdict = diff_cell(gaps["0.05"], gaps["1.0"])
            g5 = diff_cell(per_seed(runs["0.05"], "kd", metric), per_seed(runs["0.05"], "ce", metric))[0]
            g1 = diff_cell(per_seed(runs["1.0"], "kd", metric), per_seed(runs["1.0"], "ce", metric))[0]
            lines.append(f"| {mname} | {g5} | {g1} | {cell} | {verdict} |")
    per_run = ", ".join(
        f"{name} {s['bench_wall_s']:.0f} s" for name, s in runs.items() if "bench_wall_s" in s
    )
    lines += ["", f"Total wall time: {wall:.0f} s ({per_run}; {torch.get_num_threads()} torch threads)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=None, help="override train.steps (student steps)")
    ap.add_argument("--no-unlabelled", action="store_true", help="skip the SSLD-style run at 0.05")
    ap.add_argument("--markdown", default="runs/bench/classifier-digits.md", help="where the table goes")
    args = ap.parse_args()
    t0 = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    plan = [(f, False) for f in FRACTIONS] + ([] if args.no_unlabelled else [(0.05, True)])
    for fraction, unlabelled in plan:
        print(f"running label_fraction={fraction} unlabelled={unlabelled}", flush=True)
        name = str(fraction) + ("-unlabelled" if unlabelled else "")
        runs[name] = run_one(fraction, unlabelled, args.seeds, args.steps)
    text = report(runs, args.seeds, args.steps, time.perf_counter() - t0)
    print(text)
    out = Path(args.markdown)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
