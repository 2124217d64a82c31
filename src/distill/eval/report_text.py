"""A compact plain-text results table for the CLI, so a finished run can be judged without opening the report."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distill.eval.report_columns import declared_columns, text_columns
from distill.eval.report_format import as_dict, bounds, fmt_num, fmt_pct, fmt_plus_minus
from distill.eval.report_run import BEFORE_LABEL, method_order

# (header, eval field, number format, half-width format: None means fmt_plus_minus's default)
_COLUMNS: list[tuple[str, str, Callable[[Any], str], Callable[[Any], str] | None]] = [
    ("KL", "kl", fmt_num, None),
    ("reverse KL", "reverse_kl", fmt_num, None),
    ("top-1", "top1_agreement", fmt_pct, fmt_pct),
    ("student NLL", "student_nll", fmt_num, None),
]


def _cells(label: str, ev: Any, interval: Any, columns: list[tuple[str, str, Any, Any]]) -> list[str]:
    ev = as_dict(ev)
    return [label] + [
        fmt_plus_minus(fmt, ev.get(key), bounds(interval, key), half_fmt) for _, key, fmt, half_fmt in columns
    ]


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """Header plus one line per model (references such as the teacher, the student before training, then
    each method, primary first).

    Where the summary holds a seed interval a cell reads "mean ± half-width" of the 95 % t interval;
    otherwise it is the plain number, "—" where missing. Columns are padded to line up in a terminal.
    """
    summary = as_dict(summary)
    methods = as_dict(summary.get("methods"))
    columns = text_columns(declared_columns(summary)) or _COLUMNS
    rows = [["model"] + [column[0] for column in columns]]
    for label, ev in as_dict(summary.get("references")).items():
        rows.append(_cells(label, ev, None, columns))
    if as_dict(summary.get("before")):
        rows.append(_cells(BEFORE_LABEL, summary.get("before"), summary.get("before_interval"), columns))
    for name in method_order(summary):
        entry = as_dict(methods[name])
        rows.append(_cells(name, entry.get("after"), entry.get("after_interval"), columns))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))]
        ).rstrip()
        for row in rows
    ]
