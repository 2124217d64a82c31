"""DD-Ranking (Li et al. 2025, "DD-Ranking: Rethinking the Evaluation of Dataset Distillation"): separate
what a distilled set's data carries from what soft labels (knowledge distillation) and augmentation add,
by reading its accuracy against the full data with hard labels (HLR) and against a random subset of the
same size evaluated the same way (IOR)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

from distill.stats import mean_interval

__all__ = [
    "augmentation_robust_score",
    "dd_ranking_score",
    "dd_ranking_summary",
    "hard_label_recovery",
    "improvement_over_random",
    "label_robust_score",
]


def _fraction(name: str, value: float) -> float:
    v = float(value)
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise ValueError(f"{name} must be an accuracy fraction in [0, 1] (got {value}; divide % by 100)")
    return v


def _normalise(alpha: float) -> float:
    return (math.exp(alpha) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def hard_label_recovery(acc_full_hard: float, acc_syn_hard: float) -> float:
    """HLR = Acc(full data, hard labels) - Acc(set, hard labels): how much of the full-data accuracy the
    set fails to recover without soft labels. Lower is better; it isolates the data from the labels."""
    return _fraction("acc_full_hard", acc_full_hard) - _fraction("acc_syn_hard", acc_syn_hard)


def improvement_over_random(acc_syn: float, acc_random: float) -> float:
    """IOR = Acc(set) - Acc(random subset of the same size), both under the same labelling protocol
    (e.g. both with the same teacher's soft labels). Higher is better; it cancels what soft labels and
    augmentation give any data, since random rows get them too."""
    return _fraction("acc_syn", acc_syn) - _fraction("acc_random", acc_random)


def dd_ranking_score(hlr: float, ior: float, weight: float = 0.5) -> float:
    """DD-Ranking score (Label-Robust Score): alpha = weight * IOR - (1 - weight) * HLR, mapped to [0, 1]
    by (e^alpha - e^-1) / (e - e^-1). weight = 0.5 (the leaderboard default) values both equally; a
    score of 0.5 does not mean "as good as random" (alpha = 0 gives 0.2689)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1] (got {weight})")
    for name, v in (("hlr", hlr), ("ior", ior)):
        if not (math.isfinite(v) and -1.0 <= v <= 1.0):
            raise ValueError(f"{name} must be a difference of accuracy fractions in [-1, 1] (got {v})")
    return _normalise(weight * ior - (1.0 - weight) * hlr)


label_robust_score = dd_ranking_score


def augmentation_robust_score(
    acc_syn_aug: float, acc_rdm_aug: float, acc_syn_noaug: float, acc_rdm_noaug: float, gamma: float = 0.5
) -> float:
    """DD-Ranking's Augmentation-Robust Score: beta = gamma * (syn-aug - rdm-aug) + (1 - gamma) *
    (syn-noaug - rdm-noaug), "normalised similarly" to the LRS, read here as the same exp map."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1] (got {gamma})")
    aug = improvement_over_random(acc_syn_aug, acc_rdm_aug)
    noaug = improvement_over_random(acc_syn_noaug, acc_rdm_noaug)
    return _normalise(gamma * aug + (1.0 - gamma) * noaug)


AccInput = float | Sequence[float] | Mapping[str, Any]


def _per_seed(name: str, value: AccInput) -> tuple[list[float], str | None]:
    """Accuracies from a float, a per-seed list, or an `evaluate_set` result (with its label type)."""
    if isinstance(value, Mapping):
        return [float(a) for a in value["acc"]], value.get("label")
    if isinstance(value, numbers.Real):  # numpy scalars included
        return [float(value)], None
    values = [float(a) for a in cast(Iterable[float], value)]  # lists, tuples, 1-D arrays or tensors
    if not values:
        raise ValueError(f"{name} has no accuracies")
    return values, None


def dd_ranking_summary(
    acc_full_hard: AccInput,
    acc_syn_hard: AccInput,
    acc_syn_any: AccInput,
    acc_random_any: AccInput,
    *,
    weight: float = 0.5,
    level: float = 0.95,
) -> dict[str, Any]:
    """HLR, IOR and score per seed (as the reference computes them, one per evaluation run), with mean
    and Student-t interval for each. Inputs are floats, per-seed lists paired by position (a single
    value, e.g. a cached full-data accuracy, is used for every seed) or `evaluate_set` results, whose
    labelling is checked: the two "hard" inputs must be hard, and syn/random "any" must match."""
    full, full_label = _per_seed("acc_full_hard", acc_full_hard)
    syn_h, syn_h_label = _per_seed("acc_syn_hard", acc_syn_hard)
    syn_a, syn_a_label = _per_seed("acc_syn_any", acc_syn_any)
    rnd_a, rnd_a_label = _per_seed("acc_random_any", acc_random_any)
    for name, label in (("acc_full_hard", full_label), ("acc_syn_hard", syn_h_label)):
        if label not in (None, "hard"):
            raise ValueError(f"{name} must come from hard labels (got a {label}-label evaluation)")
    if None not in (syn_a_label, rnd_a_label) and syn_a_label != rnd_a_label:
        raise ValueError(f"IOR needs one labelling for both sets (got {syn_a_label} and {rnd_a_label})")
    lists = [full, syn_h, syn_a, rnd_a]
    n = max(len(v) for v in lists)
    if any(len(v) not in (1, n) for v in lists):
        raise ValueError(
            f"per-seed accuracies must share one length or be single (got {[len(v) for v in lists]})"
        )
    full, syn_h, syn_a, rnd_a = ([v[0]] * n if len(v) == 1 else v for v in lists)
    hlr = [hard_label_recovery(f, s) for f, s in zip(full, syn_h, strict=True)]
    ior = [improvement_over_random(s, r) for s, r in zip(syn_a, rnd_a, strict=True)]
    score = [dd_ranking_score(h, i, weight) for h, i in zip(hlr, ior, strict=True)]
    out: dict[str, Any] = {"weight": weight, "level": level, "hlr": hlr, "ior": ior, "score": score}
    for key, values in (("hlr", hlr), ("ior", ior), ("score", score)):
        out[f"{key}_mean"], out[f"{key}_low"], out[f"{key}_high"] = mean_interval(values, level)
    return out
