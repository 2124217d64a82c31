"""Result columns a family declares, so the report and the CLI show a classifier's accuracy or a
dataset-distillation run's test error as readily as the LM family's KL. A family returns them from
`Family.result_columns()`; the pipeline stores them as `summary["columns"]` (with the family's sentence
on what the numbers are in `summary["results_note"]`). Without them the report shows the LM family's
table, the default since the first release."""

from __future__ import annotations

from typing import Any

from distill.eval.report_doc import Table
from distill.eval.report_format import as_dict, bounds, fmt_interval, fmt_num, fmt_pct
from distill.eval.report_run import BEFORE_LABEL, method_label, seed_entries

_FORMATS = {"num": fmt_num, "pct": fmt_pct}
_ARROWS = {"lower": " ↓", "higher": " ↑"}


def declared_columns(summary: dict[str, Any]) -> list[dict[str, str]]:
    """The well-formed columns of `summary["columns"]` (key, title, format num|pct, better lower|higher)."""
    found = summary.get("columns")
    if not isinstance(found, list):
        return []
    return [
        c
        for c in found
        if isinstance(c, dict) and isinstance(c.get("key"), str) and isinstance(c.get("title"), str)
    ]


def _fmt(column: dict[str, str]) -> Any:
    return _FORMATS.get(column.get("format", "num"), fmt_num)


def _headers(columns: list[dict[str, str]]) -> list[str]:
    return ["model"] + [c["title"] + _ARROWS.get(c.get("better", ""), "") for c in columns]


def _row(label: str, ev: Any, interval: Any, columns: list[dict[str, str]]) -> list[str]:
    ev = as_dict(ev)
    return [label] + [fmt_interval(_fmt(c), ev.get(c["key"]), bounds(interval, c["key"])) for c in columns]


def declared_results_table(summary: dict[str, Any], names: list[str], columns: list[dict[str, str]]) -> Table:
    methods = as_dict(summary.get("methods"))
    rows = [_row(label, ev, None, columns) for label, ev in as_dict(summary.get("references")).items()]
    if as_dict(summary.get("before")):
        rows.append(_row(BEFORE_LABEL, summary.get("before"), summary.get("before_interval"), columns))
    for name in names:
        entry = as_dict(methods[name])
        rows.append(
            _row(method_label(name, summary), entry.get("after"), entry.get("after_interval"), columns)
        )
    return Table(_headers(columns), rows, ["l"] + ["r"] * len(columns))


def declared_per_seed_table(
    summary: dict[str, Any], names: list[str], columns: list[dict[str, str]]
) -> Table | None:
    methods = as_dict(summary.get("methods"))
    rows = [
        _row(f"{method_label(name, summary)}, seed {seed}", as_dict(entry.get("after")), None, columns)
        for name in names
        for seed, entry in seed_entries(methods[name])
    ]
    return Table(_headers(columns), rows, ["l"] + ["r"] * len(columns)) if rows else None


def text_columns(columns: list[dict[str, str]]) -> list[tuple[str, str, Any, Any]]:
    """The CLI's (header, key, format, half-width format) for declared columns."""
    return [(c["title"], c["key"], _fmt(c), _fmt(c) if c.get("format") == "pct" else None) for c in columns]
