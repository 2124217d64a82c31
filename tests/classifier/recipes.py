"""Small classifier recipes for the tests: digits (real data, shipped with scikit-learn) and a generated
graph, with few steps so each run takes seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def digits_recipe(
    out: Path, method: dict[str, Any], *, student: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "name": "test-digits",
        "output_dir": str(out / "run"),
        "data": {"kind": "digits", "batch_size": 64},
        "teacher": {
            "model": {"arch": "cnn", "options": {"width": 8}},
            "steps": 120,
            "lr": 0.01,
            "store": str(out / "teachers"),
        },
        "student": student or {"arch": "mlp", "options": {"hidden": [32]}},
        "method": method,
        "train": {"steps": 30, "lr": 0.01, "threads": 2, "max_grad_norm": None},
        "eval": {"every": 10},
    }
    recipe.update(extra)
    return recipe


def graph_recipe(out: Path, method: dict[str, Any], **extra: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "name": "test-graph",
        "output_dir": str(out / "run"),
        "data": {
            "kind": "sbm",
            "nodes": 400,
            "classes": 4,
            "features": 16,
            "feature_signal": 2.0,
            "homophily": 0.7,
            "unlabelled": True,
        },
        "teacher": {"model": {"arch": "gcn", "options": {"hidden": 16}}, "steps": 60, "lr": 0.02},
        "student": {"arch": "mlp", "options": {"hidden": [32]}},
        "method": method,
        "train": {"steps": 40, "lr": 0.01, "threads": 2},
    }
    recipe.update(extra)
    return recipe
