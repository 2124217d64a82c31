"""The report's two PNG plots: training loss per method, and held-out KL by answer position.

matplotlib is imported inside the plotting functions only, so importing the report (which the pipeline
does at start-up) costs nothing until a report is written. Figures are drawn on bare Figure objects (no
pyplot), so writing a report never switches the backend of a notebook or application that uses matplotlib.

With several seeds, a method's panel shows every seed's curve as a thin line (its own line style,
smoothed when long) rather than one seed or a mean curve: the spread between seeds is what a reader of
a multi-seed run wants to see, and the per-step noise of several seeds would bury it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from distill.eval.report_format import as_dict, as_float, fmt_int
from distill.eval.report_run import BEFORE_LABEL, method_label, metrics_files, read_metrics, seed_entries
from distill.io import write_with

BEFORE_COLOR = "#8c8c8c"
METHOD_COLORS = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9"]
SEED_STYLES = ["-", "--", ":", "-."]


def _save(fig: Any, path: Path) -> None:
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average, so the trend is visible through per-step noise."""
    out: list[float] = []
    acc = 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _draw_one(ax: Any, rows: list[dict[str, Any]], color: str) -> None:
    """A single run: faint per-step loss under its moving average when there are enough steps."""
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    if len(rows) == 1:
        ax.plot(steps, loss, "o", color=color)
    elif len(rows) >= 20:
        ax.plot(steps, loss, color=color, alpha=0.3, linewidth=1, label="per step")
        window = max(2, len(rows) // 20)
        ax.plot(steps, _smooth(loss, window), color=color, linewidth=2, label=f"mean of last {window}")
        ax.legend(fontsize=8, frameon=False)
    else:
        ax.plot(steps, loss, color=color, linewidth=1.8, marker=".")


def _draw_seeds(ax: Any, curves: list[tuple[str | None, list[dict[str, Any]]]], color: str) -> None:
    """Several seeds: one thin line each, told apart by line style, smoothed when long."""
    for i, (seed, rows) in enumerate(curves):
        steps = [int(r["step"]) for r in rows]
        loss = [float(r["loss"]) for r in rows]
        if len(rows) >= 20:
            loss = _smooth(loss, max(2, len(rows) // 20))
        style = SEED_STYLES[i % len(SEED_STYLES)]
        marker = "o" if len(rows) == 1 else None
        ax.plot(steps, loss, style, color=color, linewidth=1.2, marker=marker, label=f"seed {seed}")
    ax.legend(fontsize=8, frameon=False)


def plot_loss_curves(run_dir: Path, names: list[str], summary: dict[str, Any], path: Path) -> bool:
    """One panel per method: KD and CE losses live on different scales, so they never share an axis."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    methods = as_dict(summary.get("methods"))
    series = []
    for name in names:
        curves = []
        for seed, file in metrics_files(run_dir, name, methods.get(name)):
            rows = [r for r in read_metrics(file) if math.isfinite(r["loss"])]
            if rows:
                curves.append((seed, rows))
        if curves:
            series.append((name, curves))
    if not series:
        return False
    fig = Figure(figsize=(4.6 * len(series), 3.6))
    axes = fig.subplots(1, len(series), squeeze=False)
    for ax, (name, curves) in zip(axes[0], series, strict=True):
        color = METHOD_COLORS[names.index(name) % len(METHOD_COLORS)]
        if curves[0][0] is None:
            _draw_one(ax, curves[0][1], color)
        else:
            _draw_seeds(ax, curves, color)
        has_parts = all("kd" in r and "ce" in r for _, rows in curves for r in rows)
        ax.set_title(method_label(name, summary), fontsize=11)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("total loss (kd + ce)" if has_parts else "training loss")
        ax.grid(alpha=0.3)
    fig.suptitle("Training loss (each method on its own scale)", fontsize=12)
    fig.tight_layout()
    _save(fig, path)
    return True


def _bucket_label(bucket: dict[str, Any]) -> str:
    start, end = fmt_int(bucket.get("start")), bucket.get("end")
    return f"{start}+" if as_float(end) is None else f"{start}–{fmt_int(end)}"


def _kl_groups(summary: dict[str, Any], names: list[str]) -> list[tuple[str, str, list[Any]]]:
    """(legend label, colour, kl_by_position buckets) for the before-eval and each method that has them."""
    groups: list[tuple[str, str, list[Any]]] = []
    before = as_dict(summary.get("before")).get("kl_by_position")
    if isinstance(before, list):
        groups.append((BEFORE_LABEL, BEFORE_COLOR, before))
    methods = as_dict(summary.get("methods"))
    for i, name in enumerate(names):
        entry = as_dict(methods.get(name))
        buckets = as_dict(entry.get("after")).get("kl_by_position")
        if isinstance(buckets, list):
            label = method_label(name, summary)
            n = len(seed_entries(entry))
            if n:
                label += f", mean of {n} seeds"
            groups.append((label, METHOD_COLORS[i % len(METHOD_COLORS)], buckets))
    return groups


def plot_kl_by_position(summary: dict[str, Any], names: list[str], path: Path) -> bool:
    """Grouped bars per answer-position bucket: where in the answer the student drifts from the teacher."""
    groups = _kl_groups(summary, names)
    # Buckets keyed by their bounds, in order of first appearance; a bucket with no KL in any group is skipped.
    keys: list[tuple[Any, Any]] = []
    info: dict[tuple[Any, Any], dict[str, Any]] = {}
    values: list[dict[tuple[Any, Any], float]] = []
    for _, _, buckets in groups:
        vals: dict[tuple[Any, Any], float] = {}
        for b in buckets:
            if not isinstance(b, dict):
                continue
            key = (b.get("start"), b.get("end"))
            kl = as_float(b.get("kl"))
            if kl is None or not math.isfinite(kl):
                continue
            vals[key] = kl
            if key not in info:
                keys.append(key)
                info[key] = b
        values.append(vals)
    if not keys:
        return False
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.1 * len(keys) + 2.5), 4.0))
    ax = fig.subplots()
    width = 0.8 / len(groups)
    for g, ((label, color, _), vals) in enumerate(zip(groups, values, strict=True)):
        xs = [i + (g - (len(groups) - 1) / 2) * width for i, k in enumerate(keys) if k in vals]
        ax.bar(xs, [vals[k] for k in keys if k in vals], width=width, color=color, label=label)
    ticks = []
    for k in keys:
        tokens = info[k].get("tokens")
        ticks.append(
            _bucket_label(info[k]) + (f"\n{fmt_int(tokens)} tok" if as_float(tokens) is not None else "")
        )
    ax.set_xticks(range(len(keys)), ticks, fontsize=9)
    ax.set_xlabel("answer position (tokens into the teacher's answer)")
    ax.set_ylabel("KL(teacher ‖ student), nats/token")
    ax.set_title("Held-out KL by answer position", fontsize=12)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9, frameon=False)
    fig.tight_layout()
    _save(fig, path)
    return True
