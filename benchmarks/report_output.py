"""Print a benchmark's markdown report and, if asked, write it (folders made as needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def emit(lines: list[str], markdown: Path | None) -> None:
    text = "\n".join(lines)
    print(text)
    if markdown:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(text + "\n", encoding="utf-8")


def interval(values: list[float], digits: int = 4, pct: bool = False, signed: bool = False) -> str:
    """`mean [low, high]` (95 % Student-t over seeds); the mean alone for one seed. `pct` scales by 100."""
    from distill.stats import mean_interval

    scale = 100 if pct else 1
    mean, low, high = mean_interval(values)
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    if low != low:  # one seed
        return fmt.format(scale * mean)
    return f"{fmt.format(scale * mean)} [{fmt.format(scale * low)}, {fmt.format(scale * high)}]"


def seed_values(entry: dict[str, Any], key: str) -> dict[str, float]:
    """A method's held-out `key` at the last step, by seed (a one-seed run has no `seeds` section)."""
    seeds = entry.get("seeds")
    if seeds is None:
        return {"0": float(entry["after"][key])}
    return {s: float(e["after"][key]) for s, e in seeds.items()}
