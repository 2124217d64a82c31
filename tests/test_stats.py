"""Mean and Student-t interval over seeds: exact quantiles, hand-computed intervals, and their properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from distill.stats import mean_interval, summarise_seeds, t_quantile

# Student-t quantiles (p, df, value) from statistics tables, the large-df ones checked by integrating the
# t density numerically (Simpson, 2e5 panels) to 1e-14 in probability.
T_TABLE = [
    (0.975, 1, 12.706204736174707),
    (0.975, 2, 4.302652729749464),
    (0.975, 3, 3.182446305284263),
    (0.975, 4, 2.7764451051977934),
    (0.975, 5, 2.5705818356363146),
    (0.975, 10, 2.2281388519862744),
    (0.975, 30, 2.0422724563012378),
    (0.975, 100, 1.983971518523546),
    (0.975, 1000, 1.9623390808264078),
    (0.995, 1, 63.65674116287399),
    (0.995, 7, 3.4994832973505026),
    (0.95, 9, 1.8331129326536335),
    (0.975, 200, 1.971896223633915),
    (0.975, 201, 1.971836506777615),
]


@pytest.mark.parametrize(("p", "df", "expected"), T_TABLE)
def test_t_quantile_matches_tables(p: float, df: int, expected: float) -> None:
    assert t_quantile(p, df) == pytest.approx(expected, rel=1e-9)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, rel=1e-9)


def test_t_quantile_tends_to_normal() -> None:
    z = 1.959963984540054  # the normal 0.975 quantile; t exceeds it by about (z**3 + z) / (4 df)
    assert t_quantile(0.975, 10**7) == pytest.approx(z + (z**3 + z) / 4e7, rel=1e-12)
    assert t_quantile(0.5, 3) == 0.0
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_quantile(0.975, 0)


def test_mean_interval_by_hand() -> None:
    # [1, 2, 3]: mean 2, sample sd 1, half-width t(0.975, 2) / sqrt(3) = 4.302652729749464 / 1.7320508 = 2.4841377
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert low == pytest.approx(2 - 2.484137711750328, rel=1e-12)
    assert high == pytest.approx(2 + 2.484137711750328, rel=1e-12)
    # [2, 4, 4, 4, 5, 5, 7, 9]: mean 5, sample sd sqrt(32/7), half-width 2.3646242515927 * sqrt(32/7) / sqrt(8)
    mean, low, high = mean_interval([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    half = 2.3646242515927849 * math.sqrt(32 / 7) / math.sqrt(8)
    assert mean == 5.0 and half == pytest.approx(1.787487918, rel=1e-9)
    assert (low, high) == pytest.approx((5 - half, 5 + half), rel=1e-12)


def test_mean_interval_level_and_edges() -> None:
    _, low95, high95 = mean_interval([0.4, 0.5, 0.7])
    _, low99, high99 = mean_interval([0.4, 0.5, 0.7], level=0.99)
    assert low99 < low95 < high95 < high99
    mean, low, high = mean_interval([0.3])
    assert mean == 0.3 and math.isnan(low) and math.isnan(high)
    assert mean_interval([0.1, 0.1, 0.1]) == (0.1, 0.1, 0.1)
    mean, low, high = mean_interval([1.0, math.inf])
    assert mean == math.inf and math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError):
        mean_interval([])
    with pytest.raises(ValueError):
        mean_interval([1.0, 2.0], level=1.0)


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(st.lists(finite, min_size=2, max_size=30))
def test_interval_contains_mean(values: list[float]) -> None:
    mean, low, high = mean_interval(values)
    assert low <= mean <= high
    assert min(values) - 1e-6 <= mean <= max(values) + 1e-6


@given(st.lists(finite, min_size=2, max_size=20), st.integers(min_value=1, max_value=20))
def test_interval_shrinks_as_the_mean_is_added(values: list[float], extra: int) -> None:
    mean, low, high = mean_interval(values)
    _, low2, high2 = mean_interval(values + [mean] * extra)
    assert high2 - low2 <= (high - low) * (1 + 1e-9) + 1e-9


@given(finite, st.integers(min_value=2, max_value=50))
def test_identical_values_have_zero_width(value: float, n: int) -> None:
    assert mean_interval([value] * n) == (value, value, value)


@given(st.lists(finite, min_size=2, max_size=10))
def test_interval_shrinks_as_the_sample_repeats(values: list[float]) -> None:
    _, low, high = mean_interval(values)
    _, low2, high2 = mean_interval(values * 2)
    assert high2 - low2 <= (high - low) * (1 + 1e-9) + 1e-9


def _eval(kl: float, *, tail: float | None = None) -> dict[str, object]:
    return {
        "kl": kl,
        "reverse_kl": 0.9 * kl,
        "top1_agreement": 0.5,
        "tokens": 7000,
        "truncated": False,
        "note": "x",
        "kl_by_position": [
            {"start": 0, "end": 8, "tokens": 1000, "kl": 2 * kl},
            {"start": 8, "end": None, "tokens": 10, "kl": tail},
        ],
    }


def test_summarise_seeds() -> None:
    per_seed = {"0": _eval(1.0, tail=0.5), "1": _eval(2.0, tail=None), "2": _eval(3.0, tail=0.7)}
    per_seed["1"]["teacher_nll"] = 0.9  # only one seed has it: skipped
    out = summarise_seeds(per_seed)
    assert out["n"] == 3
    mean = out["mean"]
    assert set(mean) == {"kl", "reverse_kl", "top1_agreement", "tokens", "kl_by_position"}
    assert mean["kl"] == 2.0 and mean["reverse_kl"] == pytest.approx(1.8) and mean["tokens"] == 7000
    assert out["interval"]["kl"] == pytest.approx([2 - 2.484137711750328, 2 + 2.484137711750328])
    assert out["interval"]["top1_agreement"] == [0.5, 0.5]
    assert "kl_by_position" not in out["interval"]
    assert mean["kl_by_position"] == [
        {"start": 0, "end": 8, "tokens": 1000, "kl": 4.0},
        {"start": 8, "end": None, "tokens": 10, "kl": None},  # one seed had no KL in this bucket
    ]


def test_summarise_one_seed_and_partial_buckets() -> None:
    out = summarise_seeds({"7": _eval(1.5)})
    assert out["n"] == 1 and out["mean"]["kl"] == 1.5 and out["interval"] == {}
    a, b = _eval(1.0), _eval(3.0)
    b["kl_by_position"] = b["kl_by_position"][:1]  # type: ignore[index]
    c = _eval(2.0)
    del c["kl_by_position"]
    assert summarise_seeds({"0": a, "1": b})["mean"]["kl_by_position"] == [
        {"start": 0, "end": 8, "tokens": 1000, "kl": 4.0}
    ]
    assert "kl_by_position" not in summarise_seeds({"0": a, "1": c})["mean"]
    with pytest.raises(ValueError):
        summarise_seeds({})
