"""The report's tables: held-out results, per-seed results, training and timing.

A multi-seed method entry holds the mean eval in "after" and a 95 % t interval per field in
"after_interval" (likewise summary["before_interval"]); a cell then reads "mean (low–high)". Without an
interval a cell is just the number, so a single-seed report reads exactly as it always did.
"""

from __future__ import annotations

import math
from typing import Any

from distill.eval.report_columns import declared_columns, declared_per_seed_table, declared_results_table
from distill.eval.report_doc import Table
from distill.eval.report_format import (
    DASH,
    as_dict,
    as_float,
    bounds,
    fmt_int,
    fmt_interval,
    fmt_num,
    fmt_pct,
    fmt_ratio,
    fmt_seconds,
    ppl,
)
from distill.eval.report_run import BEFORE_LABEL, method_label, seed_entries

RESULT_HEADERS = [
    "model",
    "KL(t‖s) ↓",
    "reverse KL ↓",
    "top-1 agreement ↑",
    "student NLL ↓",
    "perplexity ↓",
    "KL vs before",
]


def _ppl_cell(ev: dict[str, Any], interval: Any) -> str:
    """Perplexity as recorded, else exp of the NLL (and of its interval bounds: exp is monotone)."""
    value, pair = ev.get("student_ppl"), bounds(interval, "student_ppl")
    if as_float(value) is None:
        value, nll_pair = ppl(ev.get("student_nll")), bounds(interval, "student_nll")
        pair = (math.exp(min(nll_pair[0], 50.0)), math.exp(min(nll_pair[1], 50.0))) if nll_pair else None
    return fmt_interval(fmt_num, value, pair)


def _result_row(label: str, ev: dict[str, Any], interval: Any, before_kl: Any) -> list[str]:
    return [
        label,
        fmt_interval(fmt_num, ev.get("kl"), bounds(interval, "kl")),
        fmt_interval(fmt_num, ev.get("reverse_kl"), bounds(interval, "reverse_kl")),
        fmt_interval(fmt_pct, ev.get("top1_agreement"), bounds(interval, "top1_agreement")),
        fmt_interval(fmt_num, ev.get("student_nll"), bounds(interval, "student_nll")),
        _ppl_cell(ev, interval),
        fmt_ratio(ev.get("kl"), before_kl),
    ]


def has_intervals(summary: dict[str, Any]) -> bool:
    """Whether any result row will show an interval (then the report says what the brackets mean)."""
    methods = as_dict(summary.get("methods"))
    found = [summary.get("before_interval"), *(as_dict(m).get("after_interval") for m in methods.values())]
    return any(as_dict(i) for i in found)


def results_table(summary: dict[str, Any], names: list[str]) -> Table:
    """Before-training student, each method after training, and the teacher's own NLL as the floor
    (the LM family's table; a family that declares its own columns gets those instead)."""
    columns = declared_columns(summary)
    if columns:
        return declared_results_table(summary, names, columns)
    methods = as_dict(summary.get("methods"))
    before = as_dict(summary.get("before"))
    before_kl = before.get("kl")
    label = BEFORE_LABEL if before else f"{BEFORE_LABEL} (not evaluated)"
    rows = [_result_row(label, before, summary.get("before_interval"), None)]
    rows[0][-1] = "1.00×" if as_float(before_kl) else DASH
    for name in names:
        entry = as_dict(methods[name])
        rows.append(
            _result_row(
                method_label(name, summary),
                as_dict(entry.get("after")),
                entry.get("after_interval"),
                before_kl,
            )
        )
    # The teacher's NLL on its own answers is the floor the student's NLL can approach.
    teacher_nll = as_float(before.get("teacher_nll"))
    for name in names:
        if teacher_nll is None:
            teacher_nll = as_float(as_dict(as_dict(methods[name]).get("after")).get("teacher_nll"))
    if teacher_nll is not None:
        nll, perplexity = fmt_num(teacher_nll), fmt_num(ppl(teacher_nll))
        rows.append(["teacher (on its own answers)", DASH, DASH, DASH, nll, perplexity, DASH])
    return Table(RESULT_HEADERS, rows, ["l"] + ["r"] * 6)


def per_seed_table(summary: dict[str, Any], names: list[str]) -> Table | None:
    """Each seed's own held-out numbers, so a reader can see what the mean and interval summarise."""
    columns = declared_columns(summary)
    if columns:
        return declared_per_seed_table(summary, names, columns)
    methods = as_dict(summary.get("methods"))
    before_kl = as_dict(summary.get("before")).get("kl")
    rows = []
    for name in names:
        for seed, entry in seed_entries(methods[name]):
            label = f"{method_label(name, summary)}, seed {seed}"
            rows.append(_result_row(label, as_dict(entry.get("after")), None, before_kl))
    return Table(RESULT_HEADERS, rows, ["l"] + ["r"] * 6) if rows else None


def _runs(name: str, entry: Any, summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(row label, single-seed entry) per training run of a method: one, or one per seed."""
    seeds = seed_entries(entry)
    if not seeds:
        return [(method_label(name, summary), as_dict(entry))]
    return [(f"{method_label(name, summary)}, seed {s}", e) for s, e in seeds]


def training_table(summary: dict[str, Any], names: list[str]) -> Table:
    """Steps, speed and final loss per training run (per seed for a multi-seed method)."""
    methods = as_dict(summary.get("methods"))
    runs = [run for name in names for run in _runs(name, methods[name], summary)]
    headers = ["method", "steps", "train time", "real tokens/s", "padding", "final loss"]
    resumed = any(m.get("resumed_from") is not None for _, m in runs)
    if resumed:
        headers.append("resumed from step")
    rows = []
    for label, m in runs:
        row = [
            label,
            fmt_int(m.get("steps")),
            fmt_seconds(m.get("train_seconds")),
            fmt_num(m.get("real_tokens_per_s"), 3),
            fmt_pct(m.get("padding_fraction")),
            fmt_num(m.get("final_loss")),
        ]
        if resumed:
            r = m.get("resumed_from")
            row.append(fmt_int(r) if as_float(r) is not None else (str(r) if r is not None else DASH))
        rows.append(row)
    return Table(headers, rows, ["l"] + ["r"] * (len(headers) - 1))


_TIMING_LABELS = {
    "load_teacher_s": "load teacher",
    "generate_s": "generate teacher answers",
    "eval_before_s": "evaluate student before training",
    "total_s": "total",
}


def _seconds(name: str, entry: Any, key: str) -> tuple[str, Any]:
    """(label suffix, seconds) of one stage of a method: summed over its seeds when it has several."""
    seeds = seed_entries(entry)
    if not seeds:
        return "", as_dict(entry).get(key)
    spent = [as_float(e.get(key)) for _, e in seeds]
    known = [s for s in spent if s is not None]
    return f" ({len(seeds)} seeds)", math.fsum(known) if known else None


def timing_table(summary: dict[str, Any], names: list[str]) -> Table:
    """Where the wall-clock time went, stage by stage."""
    timing = as_dict(summary.get("timing"))
    methods = as_dict(summary.get("methods"))
    rows = []
    for key, value in timing.items():
        if key != "total_s":
            label = _TIMING_LABELS.get(key) or key.removesuffix("_s").replace("_", " ")
            rows.append([label, fmt_seconds(value)])
    for name in names:
        for stage, key in (("train", "train_seconds"), ("evaluate", "eval_seconds")):
            suffix, seconds = _seconds(name, methods[name], key)
            rows.append([f"{stage} {name}{suffix}", fmt_seconds(seconds)])
    if "total_s" in timing:
        rows.append(["**total**", f"**{fmt_seconds(timing['total_s'])}**"])
    return Table(["stage", "time"], rows, ["l", "r"])
