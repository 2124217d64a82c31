#!/usr/bin/env python
"""Dataset distillation on sklearn digits: do the orderings the literature reports hold here?

    python benchmarks/condense_digits.py --quick                       # steps 20, 2 eval seeds: a smoke run
    python benchmarks/condense_digits.py                               # IPC 1 and 10, the recipe's 200 steps, 5 seeds
    python benchmarks/condense_digits.py --slow-steps 100 --markdown runs/bench/condense.md

Runs the built-in `digits-condense` recipe once per IPC (`--ipc 1 10`) with a CNN teacher added
(`teacher: {model: {arch: cnn, options: {width: 32}}, steps: 600, lr: 0.003}`), `eval.soft_labels: true`
and `eval.seeds` = `--seeds` (5). Methods: DM, MTT, DC (+DSA), DataDAM, SRe²L (learned) and random,
herding, DQ (selections). `train.steps` comes from the recipe (200) unless `--steps`; `--slow-steps N`
gives DC and MTT, the slowest methods, their own N steps in a run of their own (same recipe, same
controls, recomputed); SRe²L always runs on its own (`--sre2l-steps`, 1000; `--sre2l-lr`, 0.25: recovery
from noise). Output: `runs/bench/condense-ipc<k>` (`-quick` with `--quick`), `-slow` and `-sre2l`.

Reported per IPC: test accuracy of fresh CNNs trained on each set (mean ± 95 % Student-t half-width over
the evaluation seeds), of fresh MLPs and tiny ViTs (cross-architecture), with the teacher's soft labels, IOR and HLR;
the controls (full data, random subset with hard labels, random subset with teacher soft labels; the
last recomputed here per seed, to give it an interval, and checked against the run's own number). Then
the orderings: (a) every learned method above random selection at IPC 1 with non-overlapping intervals;
(b) the gap to random smaller at IPC 10 than at IPC 1; (c) MTT >= DM at IPC 1; (d) random + teacher soft
labels against random + hard labels. Last, the bytes autograd saves for an MTT unroll of 10 / 20 / 40
steps (plain, checkpoint, truncate with window 5) on the recipe's CNN.

Not collected by pytest (it lives outside tests/).
"""

# ruff: noqa: E402 - the OpenMP setting below must precede the first torch import
from __future__ import annotations

import os

# torch's OpenMP threads spin-wait between kernels by default; on 2 cores shared with other jobs that made
# the tiny steps here 6-12x slower (measured: 100 CNN steps 24-49 s spinning, 3.6-4 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from distill.classifier.models import build_model
from distill.classifier.prepare import table_rows
from distill.classifier.teachers import make_teacher
from distill.condense.dd_ranking import dd_ranking_score
from distill.condense.evaluate import evaluate_set
from distill.condense.selection import random_selection
from distill.condense.trajectory import saved_bytes_by_steps
from distill.engine.accelerator import make_accelerator
from distill.pipeline import run_recipe
from distill.progress import NullProgress
from distill.recipe import parse_recipe, resolve_recipe_path
from distill.recipe_base import RecipeBase
from distill.recipe_condense import CondenseRecipe
from distill.stats import mean_interval
from report_output import emit

TEACHER = {"model": {"arch": "cnn", "options": {"width": 32}}, "steps": 600, "lr": 0.003}
SLOW = ("mtt", "dc")
LEARNED = ("dm", "mtt", "dc", "datadam", "sre2l")
SELECTIONS = ("random", "herding", "dq")
MEMORY_STEPS = (10, 20, 40)
MEMORY_MODES: tuple[tuple[str, int | None], ...] = (("plain", None), ("checkpoint", None), ("truncate", 5))


def base_data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(resolve_recipe_path("digits-condense").read_text(encoding="utf-8"))
    return data


def make_recipe(
    ipc: int, seeds: int, steps: int | None, out: str, methods: list[dict[str, Any]]
) -> CondenseRecipe:
    """The built-in recipe with the teacher, soft labels and the given methods (the first is `method`)."""
    data = base_data()
    data["synthetic"]["ipc"] = ipc
    data["teacher"] = copy.deepcopy(TEACHER)
    data["eval"]["soft_labels"] = True
    data["eval"]["seeds"] = seeds
    data["output_dir"] = out
    data["method"], data["baselines"] = methods[0], methods[1:]
    if steps is not None:
        data["train"]["steps"] = steps
    recipe: RecipeBase = parse_recipe(data)
    assert isinstance(recipe, CondenseRecipe)
    return recipe


def all_methods(only: list[str] | None = None) -> list[dict[str, Any]]:
    """The recipe's methods (`only`: those named, with `random`, the reference every ordering needs)."""
    data = base_data()
    methods = [data["method"], *data["baselines"]]
    if only:
        methods = [m for m in methods if m["name"] in {*only, "random"}]
    return methods


def run_one(recipe: CondenseRecipe) -> dict[str, Any]:
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    t0 = time.perf_counter()
    summary = run_recipe(recipe)
    summary["bench_wall_s"] = time.perf_counter() - t0
    summary["train_steps"] = recipe.train.steps
    print(f"  {recipe.run_dir()}: {summary['bench_wall_s']:.0f} s", flush=True)
    return summary


def random_soft_per_seed(recipe: CondenseRecipe) -> list[float]:
    """The random-subset + teacher-soft-label control, per evaluation seed (the run keeps only its mean).
    Same rows (`random_selection` at the recipe seed), same teacher (loaded from its store by fingerprint),
    same soft labels and evaluation as the family's control."""
    rows = table_rows(recipe.data)
    x, y = rows.x[rows.train], rows.y[rows.train]
    acc = make_accelerator(recipe.train, recipe.run_dir())
    teacher, _ = make_teacher(recipe, rows, acc, NullProgress())
    chosen = random_selection(y, recipe.synthetic.ipc, recipe.seed)
    with torch.no_grad():
        soft = teacher(x[chosen], torch.zeros(len(chosen), dtype=torch.long)).softmax(-1).mean(0)
    e, spec = recipe.eval, recipe.eval.archs[0]
    res = evaluate_set(
        spec.arch, spec.options, rows.in_shape, rows.classes, x[chosen], y[chosen], soft=soft,
        x_test=rows.x[rows.test], y_test=rows.y[rows.test], seeds=list(range(e.seeds)), epochs=e.epochs,
        lr=e.lr, batch_size=e.batch_size,
    )  # fmt: skip
    return [float(a) for a in res["acc"]]


def side_run(
    summary: dict[str, Any], recipe: CondenseRecipe, steps: dict[str, int], walls: list[float]
) -> None:
    """Run `recipe` (methods with their own budget) and merge its methods into the main `summary`. Its
    full-data control is cut to one epoch and not used: HLR and the DD score are recomputed from the main
    run's full-data control; IOR's random + soft control is the same rows, teacher and evaluation in both
    runs (checked in the report)."""
    recipe.eval.full_epochs = 1
    second = run_one(recipe)
    full = ref(summary, "full data")
    for label, entry in second["methods"].items():
        after = entry["after"]
        if after.get("hlr") is not None:
            after["hlr"] = full - after.get("hard_accuracy", after["accuracy"])
            if after.get("dd_score") is not None:
                after["dd_score"] = dd_ranking_score(after["hlr"], after["ior"])
        summary["methods"][label] = entry
        steps[label] = second["train_steps"]
    summary.setdefault("side_references", {})[recipe.run_dir().name] = second["references"]
    walls.append(second["bench_wall_s"])


def run_ipc(ipc: int, slow_steps: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """Every method at one IPC. DC and MTT get a run of their own when `slow_steps` differs from the main
    steps; SRe²L always runs on its own with `--sre2l-steps` and `--sre2l-lr` (recovery from noise needs
    far more steps and a larger image lr than matching from real rows)."""
    suffix = ("-quick" if args.quick else "") + ("-" + "-".join(args.methods) if args.methods else "")
    out = f"runs/bench/condense-ipc{ipc}{suffix}"
    methods = all_methods(args.methods)
    main_steps = args.steps if args.steps is not None else base_data()["train"]["steps"]
    split = slow_steps is not None and slow_steps != main_steps
    own = {"sre2l", *(SLOW if split else ())}
    main = make_recipe(ipc, args.seeds, args.steps, out, [m for m in methods if m["name"] not in own])
    summary = run_one(main)
    steps = {label: summary["train_steps"] for label in summary["methods"]}
    walls = [summary["bench_wall_s"]]
    if split:
        slow = [m for m in methods if m["name"] in SLOW]
        side_run(summary, make_recipe(ipc, args.seeds, slow_steps, out + "-slow", slow), steps, walls)
    if not args.methods or "sre2l" in args.methods:
        sre2l = make_recipe(ipc, args.seeds, args.sre2l_steps, out + "-sre2l", [{"name": "sre2l"}])
        sre2l.synthetic.image_lr = args.sre2l_lr
        side_run(summary, sre2l, steps, walls)
    t0 = time.perf_counter()
    summary["random_soft_per_seed"] = random_soft_per_seed(main)
    walls.append(time.perf_counter() - t0)
    summary["method_steps"] = steps
    summary["walls"] = walls
    return summary


# ------------------------------------------------------------------ formatting


def pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def mean_pm(values: list[float]) -> str:
    mean, low, high = mean_interval(values, 0.95)
    if math.isnan(low):
        return f"{pct(mean)} ± n/a"
    return f"{pct(mean)} ± {100 * (high - low) / 2:.2f}"


def interval(values: list[float]) -> str:
    mean, low, high = mean_interval(values, 0.95)
    return f"{pct(mean)} [{pct(low)}, {pct(high)}]"


def paired(a: list[float], b: list[float]) -> str:
    """a - b per evaluation seed (same initialisation and batch order for both sets): mean [95 % t]."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean, low, high = mean_interval(d, 0.95)
    if math.isnan(low):
        return f"{100 * mean:+.2f} [n/a]"
    return f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def per_seed(s: dict[str, Any], label: str) -> list[float]:
    return [float(a) for a in s["methods"][label]["after"]["accuracy_per_seed"]]


def ref(s: dict[str, Any], prefix: str) -> float:
    for name, value in s["references"].items():
        if name.startswith(prefix):
            return float(value["accuracy"])
    return math.nan


def table(ipc: int, s: dict[str, Any]) -> list[str]:
    n = len(s["random_soft_per_seed"])
    lines = [
        f"### IPC {ipc}",
        "",
        f"Accuracies in %. CNN: fresh CNNs trained on the set with its own labels (hard, or SRe²L's teacher "
        f"relabelling), mean ± 95 % Student-t half-width over {n} evaluation seeds. The other columns are "
        "means (the run keeps only the mean for those): CNN with hard labels (differs only for SRe²L), MLP "
        "and tiny ViT (cross-architecture, the set's own labels), CNN with the teacher's soft labels. IOR (vs the random "
        "subset, both with teacher soft labels), HLR (full data minus the set with hard labels) in points; "
        "DD score = DD-Ranking's label-robust score (weight 0.5).",
        "",
        "| method | kind | distillation steps | test acc. CNN | CNN hard labels | MLP | ViT | CNN teacher soft "
        "labels | IOR | HLR | DD score | train s | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, entry in s["methods"].items():
        a = entry["after"]
        kind = "learned" if label in LEARNED else "selection"
        if label == "sre2l":
            kind = "learned (teacher soft labels)"
        steps = s["method_steps"][label] if kind != "selection" else "-"
        lines.append(
            f"| {label} | {kind} | {steps} | {mean_pm(per_seed(s, label))} "
            f"| {pct(a.get('hard_accuracy', a['accuracy']))} | {pct(a.get('accuracy_mlp'))} | {pct(a.get('accuracy_vit'))} "
            f"| {pct(a.get('soft_accuracy'))} | {pct(a.get('ior'))} | {pct(a.get('hlr'))} "
            f"| {num(a.get('dd_score'))} "
            f"| {entry.get('train_seconds', math.nan):.0f} | {entry.get('eval_seconds', math.nan):.0f} |"
        )
    rnd_soft = s["random_soft_per_seed"]
    lines += [
        "",
        "Controls (CNN):",
        "",
        "| control | test acc. |",
        "|---|---|",
        f"| full data (hard labels) | {pct(ref(s, 'full data'))} |",
        f"| random {ipc}/class (hard labels) | {mean_pm(per_seed(s, 'random'))} |",
        f"| random {ipc}/class (teacher soft labels) | {mean_pm(rnd_soft)} |",
        "",
        f"Check: the run's random-hard control {pct(ref(s, f'random {ipc}/class (hard'))} = the `random` "
        f"method's mean {pct(mean_interval(per_seed(s, 'random'))[0])}; the run's random-soft control "
        f"{pct(ref(s, f'random {ipc}/class (teacher'))} = recomputed here {pct(mean_interval(rnd_soft)[0])}."
        + "".join(
            f" Run `{name}` controls (used for its IOR): random hard "
            f"{pct(ref({'references': r}, f'random {ipc}/class (hard'))}, random soft "
            f"{pct(ref({'references': r}, f'random {ipc}/class (teacher'))}; its HLR is recomputed from the "
            "main run's full-data control."
            for name, r in s.get("side_references", {}).items()
        ),
        "",
        f"Wall: {' + '.join(f'{w:.0f}' for w in s['walls'])} s (main run, "
        + "".join(f"{name}, " for name in s.get("side_references", {}))
        + "random-soft recomputation); teacher "
        f"{s['timing'].get('teacher_s', math.nan):.0f} s, controls {s['timing'].get('references_s', math.nan):.0f} s "
        "(main run).",
        "",
    ]
    return lines


def orderings(runs: dict[int, dict[str, Any]]) -> list[str]:
    lines = ["## Orderings", ""]
    learned = [m for m in LEARNED if all(m in s["methods"] for s in runs.values())]
    if 1 in runs:
        s = runs[1]
        rnd = per_seed(s, "random")
        _, _, rnd_high = mean_interval(rnd)
        lines += [
            "(a) Learned methods vs random selection at IPC 1, CNN test accuracy, mean [95 % t interval]; "
            "paired difference per evaluation seed. SRe²L trains with the teacher's soft labels, so it is "
            "also set against the random + soft-label control.",
            "",
            f"random (hard labels): {interval(rnd)}; random (teacher soft labels): "
            f"{interval(s['random_soft_per_seed'])}",
            "",
            "| method | accuracy | vs random: intervals disjoint and above? | paired diff. vs random |",
            "|---|---|---|---|",
        ]
        for m in learned:
            acc = per_seed(s, m)
            base = s["random_soft_per_seed"] if m == "sre2l" else rnd
            _, low, _ = mean_interval(acc)
            _, _, base_high = mean_interval(base)
            verdict = "yes" if low > base_high else "no"
            note = " (vs random + soft)" if m == "sre2l" else ""
            lines.append(f"| {m} | {interval(acc)} | {verdict}{note} | {paired(acc, base)}{note} |")
        lines.append("")
    if len(runs) >= 2:
        lo, hi = min(runs), max(runs)
        lines += [
            f"(b) Gap to random selection (hard labels; SRe²L against random + soft labels), IPC {lo} vs "
            f"IPC {hi}, points: paired mean [95 % t] per IPC.",
            "",
            f"| method | gap IPC {lo} | gap IPC {hi} | shrinks? |",
            "|---|---|---|---|",
        ]
        for m in learned:
            gaps = []
            for k in (lo, hi):
                s = runs[k]
                base = s["random_soft_per_seed"] if m == "sre2l" else per_seed(s, "random")
                gaps.append(
                    ([a - b for a, b in zip(per_seed(s, m), base, strict=True)], per_seed(s, m), base)
                )
            g_lo, g_hi = (mean_interval(g[0])[0] for g in gaps)
            lines.append(
                f"| {m} | {paired(gaps[0][1], gaps[0][2])} | {paired(gaps[1][1], gaps[1][2])} "
                f"| {'yes' if g_hi < g_lo else 'no'} ({100 * (g_hi - g_lo):+.2f}) |"
            )
        lines.append("")
    if 1 in runs and "mtt" in runs[1]["methods"] and "dm" in runs[1]["methods"]:
        s = runs[1]
        mtt, dm = per_seed(s, "mtt"), per_seed(s, "dm")
        lines += [
            f"(c) IPC 1: MTT {interval(mtt)} vs DM {interval(dm)}; MTT - DM paired {paired(mtt, dm)} "
            f"(MTT ran {s['method_steps']['mtt']} steps, DM {s['method_steps']['dm']}).",
            "",
        ]
        for k, s in runs.items():
            if k != 1:
                mtt, dm = per_seed(s, "mtt"), per_seed(s, "dm")
                lines += [
                    f"    IPC {k}: MTT {interval(mtt)} vs DM {interval(dm)}; paired {paired(mtt, dm)}.",
                    "",
                ]
    lines += [
        "(d) Soft-label control: the same random rows, trained with the teacher's soft labels vs hard labels.",
        "",
        "| IPC | random + hard | random + soft | soft - hard (paired) | full data |",
        "|---|---|---|---|---|",
    ]
    for k, s in runs.items():
        hard, soft = per_seed(s, "random"), s["random_soft_per_seed"]
        lines.append(
            f"| {k} | {interval(hard)} | {interval(soft)} | {paired(soft, hard)} | {pct(ref(s, 'full data'))} |"
        )
    lines.append("")
    return lines


def memory() -> list[str]:
    def model_fn() -> torch.nn.Module:
        return build_model("cnn", [1, 8, 8], 10, {"width": 32})

    lines = [
        "## MTT unroll memory",
        "",
        "Peak bytes autograd saves for backward during one unroll (`saved_bytes_by_steps`), recipe CNN (width "
        "32), 8x8 digits, IPC 1 (10 synthetic images), full-batch steps, float32.",
        "",
        "| mode | " + " | ".join(f"{n} steps" for n in MEMORY_STEPS) + " |",
        "|---|" + "---|" * len(MEMORY_STEPS),
    ]
    for mode, window in MEMORY_MODES:
        res = saved_bytes_by_steps(model_fn, list(MEMORY_STEPS), mode, window=window)  # type: ignore[arg-type]
        name = mode if window is None else f"{mode} (window {window})"
        lines.append(f"| {name} | " + " | ".join(f"{res[n] / 2**20:.2f} MiB" for n in MEMORY_STEPS) + " |")
    lines.append("")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    p.add_argument("--steps", type=int, default=None, help="train.steps (default: the recipe's 200)")
    p.add_argument(
        "--slow-steps",
        type=int,
        nargs="+",
        default=None,
        help="train.steps for DC and MTT (own run): one value, or one per --ipc",
    )
    p.add_argument("--sre2l-steps", type=int, default=1000, help="SRe²L recovery steps (own run)")
    p.add_argument("--sre2l-lr", type=float, default=0.25, help="SRe²L image lr (recovery from noise)")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (random always runs)")
    p.add_argument("--seeds", type=int, default=5, help="evaluation seeds (fresh networks per set)")
    p.add_argument("--quick", action="store_true", help="steps 20, 2 evaluation seeds: a smoke run")
    p.add_argument("--markdown", type=Path, default=None, help="also write the report here")
    args = p.parse_args()
    if args.quick:
        args.steps, args.seeds, args.sre2l_steps = args.steps or 20, 2, min(args.sre2l_steps, 100)
    given = args.slow_steps or [None]
    if len(given) not in (1, len(args.ipc)):
        p.error("--slow-steps takes one value or one per --ipc")
    slow: dict[int, int | None] = dict(
        zip(args.ipc, given * len(args.ipc) if len(given) == 1 else given, strict=True)
    )
    if args.quick:
        slow = {k: None if v is None else min(v, args.steps) for k, v in slow.items()}
    t0 = time.perf_counter()
    runs: dict[int, dict[str, Any]] = {}
    for ipc in args.ipc:
        print(f"IPC {ipc}", flush=True)
        runs[ipc] = run_ipc(ipc, slow[ipc], args)
    t_mem = time.perf_counter()
    mem = memory()
    mem_s = time.perf_counter() - t_mem
    wall = time.perf_counter() - t0
    lines = [
        f"Steps: {args.steps or 'recipe (200)'}"
        + "".join(f"; DC and MTT at IPC {k}: {v}" for k, v in slow.items() if v is not None)
        + f"; evaluation seeds {args.seeds}; total wall {wall:.0f} s (memory table {mem_s:.0f} s).",
        "",
    ]
    for ipc, s in runs.items():
        lines += table(ipc, s)
    lines += orderings(runs)
    lines += mem
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
