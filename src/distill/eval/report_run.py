"""What the report reads from a run: the methods in the summary, their seeds, and their metrics.jsonl.

A single-seed method keeps its per-step metrics in methods/<label>/metrics.jsonl; a multi-seed method has
`"seeds": {seed: entry}` in its summary entry and one methods/<label>/seed-<seed>/metrics.jsonl per seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.eval.report_format import as_dict, as_float

BEFORE_LABEL = "student before training"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Per-step rows of a metrics.jsonl, sorted by step; a resumed run may repeat steps, the last row wins."""
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write can leave a torn last line
        step = as_float(row.get("step")) if isinstance(row, dict) else None
        if step is not None and as_float(row.get("loss")) is not None:
            by_step[int(step)] = row
    return [by_step[s] for s in sorted(by_step)]


def method_order(summary: dict[str, Any]) -> list[str]:
    """Primary method first, then the baselines in the order they ran."""
    names = list(as_dict(summary.get("methods")))
    primary = summary.get("primary")
    if primary in names:
        names.remove(primary)
        names.insert(0, primary)
    return names


def method_label(name: str, summary: dict[str, Any]) -> str:
    """The method's label with its role, so a reader knows which row the run was about."""
    return f"{name} (primary)" if name == summary.get("primary") else f"{name} (baseline)"


def _seed_key(seed: str) -> tuple[bool, int, str]:
    numeric = seed.lstrip("-").isdigit()
    return (not numeric, int(seed) if numeric else 0, seed)


def seed_entries(entry: Any) -> list[tuple[str, dict[str, Any]]]:
    """(seed, single-seed entry) pairs of a multi-seed method entry, in seed order; [] for a single seed."""
    seeds = as_dict(as_dict(entry).get("seeds"))
    return [(s, as_dict(seeds[s])) for s in sorted(seeds, key=lambda s: _seed_key(str(s)))]


def seed_count(summary: dict[str, Any]) -> int:
    """How many seeds the run used: the summary's list of seeds, else the most any method has (1 if none)."""
    seeds = summary.get("seeds")
    if isinstance(seeds, list) and seeds:
        return len(seeds)
    methods = as_dict(summary.get("methods"))
    return max((len(seed_entries(m)) for m in methods.values()), default=0) or 1


def metrics_files(run_dir: Path, name: str, entry: Any) -> list[tuple[str | None, Path]]:
    """(seed, metrics.jsonl path) per seed of a method; seed None for a single-seed method."""
    folder = run_dir / "methods" / name
    seeds = seed_entries(entry)
    if not seeds:
        return [(None, folder / "metrics.jsonl")]
    return [(s, folder / f"seed-{s}" / "metrics.jsonl") for s, _ in seeds]
