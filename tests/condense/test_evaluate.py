"""Evaluation protocol: fresh training on a small set, test scored once, DD-Ranking formulas."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import distill.condense.evaluate as ev
from distill.classifier.data import load_digits_data, split_validation, standardize
from distill.condense.dd_ranking import (
    augmentation_robust_score,
    dd_ranking_score,
    dd_ranking_summary,
    hard_label_recovery,
    improvement_over_random,
    label_robust_score,
)
from distill.condense.evaluate import cross_architecture, evaluate_set, train_fresh
from distill.condense.selection import random_selection

FAST = {"epochs": 30, "lr": 3e-3, "batch_size": 64}


@pytest.fixture(scope="module")
def digits() -> dict[str, Any]:
    data = load_digits_data(seed=0)
    x_tr, y_tr, x_val, y_val = split_validation(data.x_train, data.y_train, 0.2, seed=0)
    x_tr, x_val, x_te = standardize(x_tr, x_val, data.x_test)
    return {
        "x_tr": x_tr, "y_tr": y_tr, "x_val": x_val, "y_val": y_val, "x_te": x_te, "y_te": data.y_test,
        "in_shape": data.in_shape,
    }  # fmt: skip


def _subset(d: dict[str, Any], ipc: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    idx = random_selection(d["y_tr"], ipc, seed)
    return d["x_tr"][idx], d["y_tr"][idx]


def test_train_fresh_on_ten_real_digits_per_class_beats_chance(digits: dict[str, Any]) -> None:
    x, y = _subset(digits, 10)
    state = torch.random.get_rng_state()
    model = train_fresh("mlp", None, digits["in_shape"], 10, x, y, seed=0, **FAST)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left alone
    assert not model.training
    assert (
        ev.accuracy(model, digits["x_te"], digits["y_te"]) > 0.75
    )  # chance is 0.1; seeds 0-3 give 0.88-0.92
    again = train_fresh("mlp", None, digits["in_shape"], 10, x, y, seed=0, **FAST)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )


def test_soft_labels_train_and_are_checked(digits: dict[str, Any]) -> None:
    x, y = _subset(digits, 3)
    soft = 0.7 * torch.nn.functional.one_hot(y, 10).float() + 0.03  # smoothed labels, rows sum to 1
    model = train_fresh("mlp", None, digits["in_shape"], 10, x, y, soft=soft, seed=1, **FAST)
    assert ev.accuracy(model, digits["x_te"], digits["y_te"]) > 0.5  # 0.75-0.85 over seeds
    with pytest.raises(ValueError, match="soft labels must be probabilities"):
        train_fresh("mlp", None, digits["in_shape"], 10, x, y, soft=soft * 5, seed=1, **FAST)
    with pytest.raises(ValueError, match=r"soft labels must be \(30, 10\)"):
        train_fresh("mlp", None, digits["in_shape"], 10, x, y, soft=soft[:, :5], seed=1, **FAST)


def test_augment_runs_on_every_batch_from_the_seeded_generator(digits: dict[str, Any]) -> None:
    x, y = _subset(digits, 2)
    seen: list[float] = []

    def jitter(xb: torch.Tensor, tb: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(xb.shape, generator=gen)
        seen.append(float(noise.sum()))
        return xb + 0.1 * noise, tb

    kw = {"epochs": 3, "lr": 1e-3, "batch_size": 8, "augment": jitter, "seed": 4}
    train_fresh("mlp", None, digits["in_shape"], 10, x, y, **kw)
    first, seen[:] = list(seen), []
    train_fresh("mlp", None, digits["in_shape"], 10, x, y, **kw)
    assert len(first) == 3 * 3 and first == seen  # 20 rows: batches of 8, 8, 4 per epoch


def test_select_best_needs_a_validation_split(digits: dict[str, Any]) -> None:
    x, y = _subset(digits, 1)
    with pytest.raises(ValueError, match='select="best" needs x_val and y_val'):
        train_fresh("mlp", None, digits["in_shape"], 10, x, y, select="best", seed=0, **FAST)
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        train_fresh("nope", None, digits["in_shape"], 10, x, y, seed=0, **FAST)


def test_evaluate_set_reports_per_seed_accuracy_and_interval(digits: dict[str, Any]) -> None:
    x, y = _subset(digits, 3)
    out = evaluate_set(
        "mlp", None, digits["in_shape"], 10, x, y, x_test=digits["x_te"], y_test=digits["y_te"],
        seeds=[0, 1], x_val=digits["x_val"], y_val=digits["y_val"], **FAST,
    )  # fmt: skip
    assert out["seeds"] == [0, 1] and len(out["acc"]) == 2 and out["label"] == "hard"
    assert out["low"] <= out["mean"] <= out["high"] and out["mean"] == pytest.approx(sum(out["acc"]) / 2)
    assert out["epoch"] == [FAST["epochs"]] * 2 and all(v is not None for v in out["val_acc"])
    assert out["n_syn"] == 30 and out["mean"] > 0.3


def test_test_split_is_scored_once_and_never_selects(digits: dict[str, Any], monkeypatch: Any) -> None:
    """Every accuracy call is recorded: the test tensor is scored once per seed, after all validation
    calls of that seed; and scrambling the test labels changes nothing about which epoch is chosen."""
    x, y = _subset(digits, 2)
    calls: list[str] = []
    real_accuracy = ev.accuracy

    def recording(
        model: torch.nn.Module, xs: torch.Tensor, ys: torch.Tensor, batch_size: int = 1024
    ) -> float:
        calls.append("test" if xs is digits["x_te"] else "val" if xs is digits["x_val"] else "other")
        return real_accuracy(model, xs, ys, batch_size)

    monkeypatch.setattr(ev, "accuracy", recording)
    kw: dict[str, Any] = {
        "seeds": [0, 1], "epochs": 8, "lr": 3e-3, "batch_size": 64, "select": "best",
        "x_val": digits["x_val"], "y_val": digits["y_val"], "x_test": digits["x_te"],
    }  # fmt: skip
    out = evaluate_set("mlp", None, digits["in_shape"], 10, x, y, y_test=digits["y_te"], **kw)
    assert calls == (["val"] * 8 + ["test"]) * 2
    scrambled = digits["y_te"][
        torch.randperm(len(digits["y_te"]), generator=torch.Generator().manual_seed(0))
    ]
    other = evaluate_set("mlp", None, digits["in_shape"], 10, x, y, y_test=scrambled, **kw)
    assert other["epoch"] == out["epoch"] and other["val_acc"] == out["val_acc"]


def test_cross_architecture_checks_every_arch_first(digits: dict[str, Any], monkeypatch: Any) -> None:
    x, y = _subset(digits, 1)
    test = {"x_test": digits["x_te"][:50], "y_test": digits["y_te"][:50]}
    fits: list[str] = []
    real_fit = ev._fit
    monkeypatch.setattr(ev, "_fit", lambda arch, *a, **k: fits.append(arch) or real_fit(arch, *a, **k))
    with pytest.raises(ValueError, match="unknown architecture 'resnett'"):
        cross_architecture(["mlp", "resnett"], digits["in_shape"], 10, x, y, **test)
    assert fits == []
    out = cross_architecture(
        ["mlp", "cnn"], digits["in_shape"], 10, x, y, options={"cnn": {"width": 8}},
        seeds=[0, 1], epochs=2, lr=1e-3, **test,
    )  # fmt: skip
    assert list(out) == ["mlp", "cnn"] and fits == ["mlp", "mlp", "cnn", "cnn"]
    assert all(len(r["acc"]) == 2 for r in out.values())


def _lrs(alpha: float) -> float:
    return (math.exp(alpha) - math.exp(-1)) / (math.exp(1) - math.exp(-1))


def test_dd_ranking_formulas_on_constructed_numbers() -> None:
    hlr = hard_label_recovery(0.90, 0.60)
    ior = improvement_over_random(0.70, 0.50)
    assert hlr == pytest.approx(0.30) and ior == pytest.approx(0.20)
    assert dd_ranking_score(hlr, ior) == pytest.approx(_lrs(0.5 * 0.20 - 0.5 * 0.30))
    assert dd_ranking_score(hlr, ior, weight=0.8) == pytest.approx(_lrs(0.8 * 0.20 - 0.2 * 0.30))
    assert dd_ranking_score(0.0, 1.0, weight=1.0) == pytest.approx(1.0)  # the ends of [0, 1]
    assert dd_ranking_score(1.0, 0.0, weight=0.0) == pytest.approx(0.0)
    assert dd_ranking_score(0.0, 0.0) == pytest.approx(0.26894, abs=1e-5)
    assert label_robust_score is dd_ranking_score
    ars = augmentation_robust_score(0.7, 0.6, 0.5, 0.45, gamma=0.25)
    assert ars == pytest.approx(_lrs(0.25 * 0.1 + 0.75 * 0.05))


def test_dd_ranking_rejects_percentages_and_bad_weights() -> None:
    with pytest.raises(ValueError, match=r"^acc_full_hard must be an accuracy fraction in \[0, 1\]"):
        hard_label_recovery(87.9, 0.5)
    with pytest.raises(ValueError, match="weight must be in"):
        dd_ranking_score(0.1, 0.1, weight=1.5)
    with pytest.raises(ValueError, match="hlr must be a difference"):
        dd_ranking_score(30.0, 0.1)


def test_dd_ranking_summary_pairs_seeds_and_checks_labelling() -> None:
    out = dd_ranking_summary(0.9, [0.6, 0.5], [0.7, 0.65], [0.5, 0.55])
    assert out["hlr"] == pytest.approx([0.3, 0.4]) and out["ior"] == pytest.approx([0.2, 0.1])
    expected = [_lrs(0.5 * 0.2 - 0.5 * 0.3), _lrs(0.5 * 0.1 - 0.5 * 0.4)]
    assert out["score"] == pytest.approx(expected)
    assert out["score_mean"] == pytest.approx(sum(expected) / 2)
    assert out["hlr_low"] < out["hlr_mean"] < out["hlr_high"]
    soft = {"acc": [0.7, 0.65], "label": "soft"}
    with pytest.raises(ValueError, match="IOR needs one labelling"):
        dd_ranking_summary(0.9, [0.6, 0.5], soft, {"acc": [0.5, 0.55], "label": "hard"})
    with pytest.raises(ValueError, match="acc_syn_hard must come from hard labels"):
        dd_ranking_summary(0.9, soft, soft, soft)
    with pytest.raises(ValueError, match="share one length"):
        dd_ranking_summary(0.9, [0.6, 0.5], [0.7, 0.6, 0.5], 0.5)
