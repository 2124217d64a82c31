"""GLNN on a stochastic block model: how much of the GCN - MLP gap does KD close, and how much faster is
the MLP at inference?

    python benchmarks/classifier_graph.py                     # the graph-glnn recipe as is, 5 seeds
    python benchmarks/classifier_graph.py --homophily 0.3     # one homophily sweep point
    python benchmarks/classifier_graph.py --timing-only       # re-time an existing run (no training)

Runs the built-in `graph-glnn` recipe (GCN teacher trained full-batch on 20 labelled nodes per class;
MLP student trained with `kd` on the teacher's soft labels over the labelled nodes plus an unlabelled node
pool, or with `ce` on the labelled nodes alone) into `runs/bench/classifier-graph` (with `--homophily h`:
`runs/bench/classifier-graph-h<h>`). Then, in this script:

* GCN test accuracy over 5 init seeds (same graph, same options as the recipe's teacher; seed 0 is the
  recipe's own teacher, which every student distils);
* per seed, the fraction of the GCN - CE gap that KD closes: (KD - CE) / (GCN - CE), with the recipe's
  teacher as GCN; mean and 95 % t interval over seeds;
* inference time, interleaved, after a warm-up, `--reps` repetitions (each the mean of `--inner` calls):
  the GCN's forward over the whole graph (the adjacency is built once beforehand; any prediction needs
  it) vs the exported seed-0 KD MLP over the test nodes, over all nodes and over a single node.

"last" is the student at the final step; "best on validation" the checkpoint with the highest validation
accuracy. The test split is never used to choose anything. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from distill.classifier.models import model_from_config
from distill.classifier.prepare import Rows, load_rows
from distill.graphs.gnn import GCN, GraphModule, train_full_batch
from distill.pipeline import run_recipe
from distill.recipe import load_recipe
from distill.recipe_classifier import ClassifierRecipe
from distill.stats import mean_interval

METRICS = (("accuracy", "last"), ("best_accuracy", "best on validation"))


def make_recipe(homophily: float | None, seeds: list[int]) -> ClassifierRecipe:
    out = "runs/bench/classifier-graph" + (f"-h{homophily:g}" if homophily is not None else "")
    overrides = [f"output_dir={out}", f"seeds={seeds}"]
    if homophily is not None:
        overrides.append(f"data.homophily={homophily}")
    recipe = load_recipe("graph-glnn", overrides)
    assert isinstance(recipe, ClassifierRecipe)
    return recipe


def per_seed(summary: dict[str, Any], label: str, metric: str) -> dict[int, float]:
    entry = summary["methods"][label]
    if "seeds" not in entry:
        return {int(summary["seeds"][0]): float(entry["after"].get(metric, math.nan))}
    return {int(s): float(e["after"].get(metric, math.nan)) for s, e in entry["seeds"].items()}


def pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:.2f}"


def mean_pm(values: list[float], scale: float = 100.0) -> str:
    mean, low, high = mean_interval(values)
    half = "n/a" if math.isnan(low) else f"{scale * (high - low) / 2:.2f}"
    return f"{scale * mean:.2f} ± {half}"


def interval_cell(values: list[float], scale: float = 100.0, sign: bool = True) -> tuple[str, str]:
    mean, low, high = mean_interval(values)
    f = "{:+.2f}" if sign else "{:.2f}"
    if math.isnan(low):
        return f"{f.format(scale * mean)} [n/a] (n={len(values)})", "n/a"
    verdict = "> 0" if low > 0 else "< 0" if high < 0 else "includes 0"
    text = f"{f.format(scale * mean)} [{f.format(scale * low)}, {f.format(scale * high)}] (n={len(values)})"
    return text, verdict


def train_gcns(
    recipe: ClassifierRecipe, rows: Rows, seeds: list[int]
) -> dict[int, tuple[GraphModule, float]]:
    """GCNs built and trained exactly as the recipe's teacher, one per init seed: {seed: (module, test acc)}."""
    t = recipe.teacher
    assert t is not None and rows.graph is not None
    out = {}
    for seed in seeds:
        torch.manual_seed(seed)
        gnn = GCN(rows.x.shape[1], rows.classes, **t.model.options)
        info = train_full_batch(
            gnn, rows.graph, epochs=t.steps, lr=t.lr, weight_decay=t.weight_decay, seed=seed
        )
        out[seed] = (GraphModule.for_graph(gnn, rows.graph).eval(), float(info["test_acc"]))
    return out


def load_student(run_dir: Path, label: str = "kd", seed: int = 0) -> torch.nn.Module:
    folder = run_dir / "methods" / label / f"seed-{seed}" / "student"
    if not folder.exists():  # a one-seed run has no seed-<s> level
        folder = run_dir / "methods" / label / "student"
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model = model_from_config(config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


def time_interleaved(
    calls: dict[str, Callable[[], object]], reps: int, inner: int, warmup: int = 5
) -> dict[str, list[float]]:
    """Milliseconds per call: each repetition runs every variant (order rotated per repetition) `inner`
    times back to back and records the mean; `warmup` untimed calls of each first."""
    names = list(calls)
    with torch.no_grad():
        for name in names:
            for _ in range(warmup):
                calls[name]()
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(reps):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                fn = calls[name]
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times[name].append((time.perf_counter() - t0) * 1000 / inner)
    return times


def timing_table(gcn: GraphModule, mlp: torch.nn.Module, rows: Rows, reps: int, inner: int) -> list[str]:
    x, test = rows.x, rows.test
    x_test, x_one = x[test].contiguous(), x[test[:1]].contiguous()
    calls: dict[str, Callable[[], object]] = {
        "gcn_graph": lambda: gcn(x),
        "mlp_test": lambda: mlp(x_test),
        "mlp_all": lambda: mlp(x),
        "mlp_one": lambda: mlp(x_one),
    }
    t = time_interleaved(calls, reps, inner)
    med = {k: statistics.median(v) for k, v in t.items()}
    n, e = rows.graph.num_nodes if rows.graph else len(x), rows.graph.num_edges if rows.graph else 0
    desc = {
        "gcn_graph": (f"GCN, full graph ({n} nodes, {e} edges); also its one-node latency", n),
        "mlp_test": ("MLP + KD, test nodes", len(test)),
        "mlp_all": ("MLP + KD, all nodes", n),
        "mlp_one": ("MLP + KD, one node", 1),
    }
    lines = [
        f"Inference, ms per call: median (min-max) of {reps} interleaved repetitions, each the mean of "
        f"{inner} calls, after a warm-up; {torch.get_num_threads()} torch threads, CPU, no grad.",
        "",
        "| forward | rows out | ms median | ms min-max | GCN full graph / this |",
        "|---|---|---|---|---|",
    ]
    for key, (what, count) in desc.items():
        ratio = med["gcn_graph"] / med[key]
        lines.append(
            f"| {what} | {count} | {med[key]:.3f} | {min(t[key]):.3f}-{max(t[key]):.3f} | {ratio:.1f}x |"
        )
    lines += [
        "",
        f"Per-node latency for one node: MLP {med['mlp_one']:.3f} ms vs GCN {med['gcn_graph']:.3f} ms (the "
        f"GCN propagates over the whole graph to answer for one node): {med['gcn_graph'] / med['mlp_one']:.1f}x. "
        f"Amortised over the test nodes: GCN {1000 * med['gcn_graph'] / len(test):.2f} us/node (one full-graph "
        f"pass serves them all) vs MLP {1000 * med['mlp_test'] / len(test):.2f} us/node.",
    ]
    return lines


def accuracy_table(
    summary: dict[str, Any], gcns: dict[int, tuple[GraphModule, float]], mlp_acc: float, teacher_seed: int
) -> list[str]:
    teacher = float(summary["references"]["teacher"]["accuracy"])
    d = summary["data"]["classifier"]
    lines = [
        f"Graph: {d['name']}, {d['classes']} classes; {d['labelled_rows']} labelled nodes, {d['train_rows']} "
        f"training nodes (labelled + unlabelled pool), {d['validation_rows']} validation, {d['test_rows']} "
        "test. Accuracies in %, mean ± 95 % t half-width over seeds.",
        "",
        "| model | test acc. (last) | test acc. (best on validation) |",
        "|---|---|---|",
        f"| GCN teacher of the run (seed {teacher_seed}; every student distils it) | {pct(teacher)} | "
        "(GCN keeps its best-on-validation epoch) |",
        f"| GCN, {len(gcns)} init seeds (this script, same recipe options) | "
        f"{mean_pm([a for _, a in gcns.values()])} | (same) |",
    ]
    for label, title in (("kd", "MLP + KD (soft labels, unlabelled pool)"), ("ce", "MLP + CE (labels)")):
        cells = [mean_pm(list(per_seed(summary, label, m).values())) for m, _ in METRICS]
        lines.append(f"| {title} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        f"Reloaded exported seed-0 KD student, test accuracy: {pct(mlp_acc)} (check: should equal the run's "
        f"seed-0 'last': {pct(per_seed(summary, 'kd', 'accuracy').get(0, math.nan))}).",
        "",
        "| quantity | metric | mean [95 % t interval] | vs 0 |",
        "|---|---|---|---|",
    ]
    for metric, mname in METRICS:
        kd, ce = per_seed(summary, "kd", metric), per_seed(summary, "ce", metric)
        seeds = sorted(set(kd) & set(ce))
        cell, verdict = interval_cell([kd[s] - ce[s] for s in seeds])
        lines.append(f"| KD - CE, points (paired by seed) | {mname} | {cell} | {verdict} |")
        cell, verdict = interval_cell([teacher - ce[s] for s in seeds])
        lines.append(f"| GCN - CE, points | {mname} | {cell} | {verdict} |")
        cell, verdict = interval_cell([teacher - kd[s] for s in seeds])
        lines.append(f"| GCN - KD, points | {mname} | {cell} | {verdict} |")
        closed = [(kd[s] - ce[s]) / (teacher - ce[s]) for s in seeds if teacher != ce[s]]
        cell, _ = interval_cell(closed, sign=False)
        mean, low, _high = mean_interval(closed)
        if any(teacher <= ce[s] for s in seeds):  # no gap to close: the ratio's sign means nothing
            cell, verdict = f"({cell})", "not meaningful: the GCN is not above CE on every seed"
        else:
            verdict = (
                "n/a" if math.isnan(low) else "> 50 %" if low > 0.5 else f"lower bound {100 * low:.0f} %"
            )
        lines.append(f"| share of GCN - CE gap closed by KD, % (per seed) | {mname} | {cell} | {verdict} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--homophily", type=float, default=None, help="override data.homophily (sweep point)")
    ap.add_argument("--timing-only", action="store_true", help="reuse the run's eval.json and students")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: train.threads)")
    ap.add_argument("--markdown", default=None, help="default: <run dir>/benchmark.md")
    args = ap.parse_args()
    t_start = time.perf_counter()
    recipe = make_recipe(args.homophily, args.seeds)
    run_dir = recipe.run_dir()
    torch.set_num_threads(args.threads or recipe.train.threads or torch.get_num_threads())
    if args.timing_only:
        summary = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    else:
        t0 = time.perf_counter()
        summary = run_recipe(recipe)
        print(f"recipe run ({run_dir}): {time.perf_counter() - t0:.0f} s", flush=True)
        torch.set_num_threads(args.threads or recipe.train.threads or torch.get_num_threads())
    rows = load_rows(recipe)
    t0 = time.perf_counter()
    gcns = train_gcns(recipe, rows, args.seeds)
    print(f"GCNs trained in this script: {time.perf_counter() - t0:.0f} s", flush=True)
    mlp = load_student(run_dir, "kd", args.seeds[0])
    with torch.no_grad():
        mlp_acc = float((mlp(rows.x[rows.test]).argmax(-1) == rows.y[rows.test]).float().mean())
    lines = [f"Run: {run_dir} (homophily {getattr(recipe.data, 'homophily', 'n/a')}, seeds {args.seeds})", ""]
    lines += accuracy_table(summary, gcns, mlp_acc, recipe.seed)
    lines += [""] + timing_table(gcns[args.seeds[0]][0], mlp, rows, args.reps, args.inner)
    lines += ["", f"Total wall time: {time.perf_counter() - t_start:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = (
        Path(args.markdown)
        if args.markdown
        else run_dir / ("timing.md" if args.timing_only else "benchmark.md")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
