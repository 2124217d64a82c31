"""Number formatting for the report and the CLI, tolerant of whatever an older or partial summary holds.

A report is written at the end of a long run and must not crash on a missing or odd value: anything that
is not a real number renders as "—".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

DASH = "—"


def as_dict(value: Any) -> dict[str, Any]:
    """`value` if it is a dict, else an empty one, so lookups chain without checks."""
    return value if isinstance(value, dict) else {}


def as_float(value: Any) -> float | None:
    """A real number or None (bools and strings are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def fmt_num(value: Any, digits: int = 4) -> str:
    """`digits` significant digits; large values as grouped integers so they never turn into 1.2e+04."""
    x = as_float(value)
    if x is None:
        return DASH
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:,.0f}"
    if x == 0:
        return "0"
    return f"{x:#.{digits}g}".rstrip(".")  # "#" keeps trailing zeros but can leave "1000."


def fmt_int(value: Any) -> str:
    """A count, rounded and grouped."""
    x = as_float(value)
    return DASH if x is None or not math.isfinite(x) else f"{round(x):,}"


def fmt_pct(value: Any) -> str:
    """A fraction as a percentage with one decimal."""
    x = as_float(value)
    return DASH if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def fmt_ratio(after: Any, before: Any) -> str:
    """after / before as "0.25×", the at-a-glance effect of training."""
    a, b = as_float(after), as_float(before)
    if a is None or b is None or b <= 0 or not math.isfinite(a) or not math.isfinite(b):
        return DASH
    r = a / b
    return f"{r:.2f}×" if r >= 0.095 else f"{r:.2g}×"  # two decimals, but never round a big win to 0.00×


def fmt_seconds(value: Any) -> str:
    """Durations a reader can take in at a glance: 42.0 s, 5m 03s, 2h 07m."""
    x = as_float(value)
    if x is None or not math.isfinite(x):
        return DASH
    if x < 60:
        return f"{x:.1f} s"
    total = round(x)
    if total < 3600:
        return f"{total // 60}m {total % 60:02d}s"
    return f"{total // 3600}h {total % 3600 // 60:02d}m"


def fmt_count(value: Any) -> str:
    """Parameter counts as 48.0M / 1.20B, which is how model sizes are usually quoted."""
    x = as_float(value)
    if x is None or not math.isfinite(x):
        return DASH
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:#.3g}".rstrip(".") + suffix
    return f"{x:.0f}"


def ppl(nll: Any) -> float | None:
    """Perplexity from a mean NLL, for summaries that recorded only the NLL."""
    x = as_float(nll)
    return None if x is None or not math.isfinite(x) else math.exp(min(x, 50.0))


def bounds(interval: Any, name: str) -> tuple[float, float] | None:
    """The finite [low, high] pair recorded for `name` in an interval dict, else None."""
    pair = as_dict(interval).get(name)
    if not isinstance(pair, list | tuple) or len(pair) != 2:
        return None
    low, high = as_float(pair[0]), as_float(pair[1])
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return None
    return low, high


def fmt_interval(fmt: Callable[[Any], str], mean: Any, pair: tuple[float, float] | None) -> str:
    """Format as "mean (low–high)" for the report's tables; just the mean where no interval exists, or
    where the bounds print the same (every seed agreed), since "4.100 (4.100–4.100)" only adds noise."""
    low, high = (fmt(pair[0]), fmt(pair[1])) if pair is not None else ("", "")
    if pair is None or as_float(mean) is None or low == high:
        return fmt(mean)
    return f"{fmt(mean)} ({low}–{high})"


def fmt_plus_minus(
    fmt: Callable[[Any], str],
    mean: Any,
    pair: tuple[float, float] | None,
    half_fmt: Callable[[Any], str] | None = None,
) -> str:
    """Format as "mean ± half-width" for compact text (a t interval is symmetric). By default the
    half-width gets two significant digits, since it is itself only roughly known from a few seeds."""
    if pair is None or as_float(mean) is None:
        return fmt(mean)
    half = (pair[1] - pair[0]) / 2
    return f"{fmt(mean)} ± {half_fmt(half) if half_fmt else fmt_num(half, 2)}"
