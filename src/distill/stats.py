"""Results over several seeds: a mean with a Student-t confidence interval, field by field.

A handful of seeds is too few for a normal interval, so the Student-t quantile is used. scipy is not a
dependency of distill, so the quantile is computed here: exactly for integer degrees of freedom up to
200 (the closed-form Student-t CDF of Abramowitz & Stegun 26.7.3/26.7.4, inverted by bisection), and by
the Cornish-Fisher expansion around the normal quantile beyond that (error far below 1e-9 there).
Pure Python, no torch, so the CLI and the report can use it without loading a model stack.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

# Above this many degrees of freedom the Cornish-Fisher series is used instead of the exact CDF.
_EXACT_DF_MAX = 200


def _number(value: Any) -> bool:
    """True for real numbers (bools are flags, not metrics)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _two_sided_mass(theta: float, df: int) -> float:
    """P(|T| <= sqrt(df)·tan(theta)) for Student's t with integer `df` (A&S 26.7.3 and 26.7.4)."""
    c2 = math.cos(theta) ** 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    term = total = math.cos(theta)
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * total)


def _cornish_fisher(z: float, df: int) -> float:
    """Student-t quantile from the normal quantile `z`, in powers of 1/df (A&S 26.7.5)."""
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (e.g. p=0.975, df=2 gives 4.3027).

    Needed for the interval half-width; exposed so its accuracy can be tested on its own."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    if p == 0.5:
        return 0.0
    if df > _EXACT_DF_MAX:
        return _cornish_fisher(statistics.NormalDist().inv_cdf(p), df)
    mass = 2 * p - 1  # P(|T| <= t) for the wanted t
    lo, hi = 0.0, math.pi / 2
    for _ in range(200):  # bisection on the angle: a bounded domain, monotone mass
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if _two_sided_mass(mid, df) < mass:
            lo = mid
        else:
            hi = mid
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its two-sided Student-t interval at `level`.

    One value gives (v, nan, nan): the spread between seeds cannot be estimated from one seed, and a
    zero-width interval would claim a certainty the run does not have. Identical values give a zero-width
    interval. If any value is not finite, the bounds are nan and the mean is whatever the floats give.
    """
    if not values:
        raise ValueError("mean_interval needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    xs = [float(v) for v in values]
    if not all(math.isfinite(x) for x in xs):
        return math.fsum(xs) / len(xs), math.nan, math.nan
    mean = statistics.fmean(xs)
    if len(xs) == 1:
        return mean, math.nan, math.nan
    if min(xs) == max(xs):
        return xs[0], xs[0], xs[0]
    half = t_quantile((1 + level) / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def _mean_buckets(per_seed: list[list[Any]]) -> list[dict[str, Any]]:
    """Bucket-wise mean of kl_by_position lists, matching buckets by their (start, end) bounds.

    Only buckets every seed has are kept; a field that is not a number in every seed becomes None."""
    keyed = [{(b.get("start"), b.get("end")): b for b in seeds if isinstance(b, dict)} for seeds in per_seed]
    out = []
    for key, first in keyed[0].items():
        if not all(key in k for k in keyed[1:]):
            continue
        bucket: dict[str, Any] = {"start": key[0], "end": key[1]}
        for name in first:
            if name not in bucket:
                got: list[Any] = [k[key].get(name) for k in keyed]
                bucket[name] = statistics.fmean(got) if all(_number(v) for v in got) else None
        out.append(bucket)
    return out


def summarise_seeds(per_seed: dict[str, dict[str, Any]], level: float = 0.95) -> dict[str, Any]:
    """Collapse {seed: eval dict} into {"mean": {...}, "interval": {field: [low, high]}, "n": seeds}.

    Every top-level field that is a number in all seeds gets a mean; "interval" holds only the fields
    whose interval is defined (so none when n == 1, see mean_interval). kl_by_position, when every seed
    has one, is averaged bucket by bucket into mean["kl_by_position"] (no interval: too few tokens per
    bucket for it to mean much). Other lists and dicts are skipped. Note that mean["student_ppl"] is the
    mean of the seeds' perplexities, not exp of the mean NLL.
    """
    evals = list(per_seed.values())
    if not evals:
        raise ValueError("summarise_seeds needs at least one seed")
    mean: dict[str, Any] = {}
    interval: dict[str, list[float]] = {}
    for name in evals[0]:
        got: list[Any] = [ev.get(name) for ev in evals]
        if all(_number(v) for v in got):
            m, low, high = mean_interval([float(v) for v in got], level)
            mean[name] = m
            if math.isfinite(low) and math.isfinite(high):
                interval[name] = [low, high]
        elif name == "kl_by_position" and all(isinstance(v, list) for v in got):
            mean[name] = _mean_buckets(got)
    return {"mean": mean, "interval": interval, "n": len(evals)}
