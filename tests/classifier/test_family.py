"""The classifier family end to end on real data (sklearn digits) and on a generated graph: teacher
trained once and reused, seeds with intervals, last and best-on-validation accuracy, the report's
per-class figure, and an export that loads as a plain state_dict plus its config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.classifier.models import model_from_config
from distill.classifier.prepare import load_rows
from distill.errors import RecipeError
from distill.pipeline import run_recipe
from distill.recipe import parse_recipe
from tests.classifier.recipes import digits_recipe, graph_recipe


def test_digits_kd_and_ce_over_two_seeds(tmp_path: Path) -> None:
    data = digits_recipe(
        tmp_path, {"name": "kd", "temperature": 4.0}, baselines=[{"name": "ce"}], seeds=[0, 1]
    )
    summary = run_recipe(parse_recipe(data))
    teacher = summary["references"]["teacher"]["accuracy"]
    assert teacher > 0.85  # a CNN on digits after 120 steps
    for label in ("kd", "ce"):
        entry = summary["methods"][label]
        assert set(entry["seeds"]) == {"0", "1"}
        assert 0.5 < entry["after"]["accuracy"] <= 1.0
        assert "accuracy" in entry["after_interval"] and "best_accuracy" in entry["after"]
        assert entry["seeds"]["0"]["after"]["best_step"] in (10, 20, 30)
    assert summary["columns"][0]["key"] == "accuracy"
    run = tmp_path / "run"
    assert (run / "per_class_accuracy.png").stat().st_size > 1000
    report = (run / "report.md").read_text()
    assert "teacher" in report and "test accuracy (last)" in report

    # The export is a plain state_dict + config; it reproduces the reported test accuracy.
    folder = run / "methods" / "kd" / "seed-0" / "student"
    model = model_from_config(json.loads((folder / "config.json").read_text()))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    rows = load_rows(parse_recipe(data))  # type: ignore[arg-type]
    with torch.no_grad():
        acc = float((model.eval()(rows.x[rows.test]).argmax(-1) == rows.y[rows.test]).double().mean())
    assert acc == pytest.approx(summary["methods"]["kd"]["seeds"]["0"]["after"]["accuracy"], abs=1e-12)

    # The teacher was trained once and is reused by a second run with the same data and teacher.
    stored = list((tmp_path / "teachers").iterdir())
    assert len(stored) == 1 and (stored[0] / "model" / "model.safetensors").exists()
    again = run_recipe(
        parse_recipe({**data, "output_dir": str(tmp_path / "run2"), "seeds": [0], "baselines": []})
    )
    assert again["references"]["teacher"]["accuracy"] == teacher
    assert again["timing"]["teacher_s"] < summary["timing"]["teacher_s"]


def test_ensemble_teacher_and_label_free_kd(tmp_path: Path) -> None:
    data = digits_recipe(tmp_path, {"name": "kd"}, seeds=[0])
    data["teacher"]["ensemble"] = 2
    data["data"].update({"label_fraction": 0.1, "unlabelled": True})
    summary = run_recipe(parse_recipe(data))
    assert summary["teacher_info"]["members"] == 2 and len(list((tmp_path / "teachers").iterdir())) == 2
    assert summary["methods"]["kd"]["after"]["accuracy"] > 0.5
    rows = summary["data"]["classifier"]
    assert rows["labelled_rows"] < rows["train_rows"] / 5


def test_graph_glnn(tmp_path: Path) -> None:
    vq = {"name": "vqgraph", "student_layer": "layers.0", "codes": 8}
    summary = run_recipe(
        parse_recipe(
            graph_recipe(tmp_path, {"name": "kd", "temperature": 1.0}, baselines=[{"name": "ce"}, vq])
        )
    )
    teacher = summary["references"]["teacher"]
    assert teacher["accuracy"] > 0.7 and teacher["inference_ms_per_1k"] > 0
    assert summary["methods"]["kd"]["after"]["accuracy"] > 0.4
    assert summary["methods"]["vqgraph"]["after"]["accuracy"] > 0.4
    assert summary["methods"]["vqgraph"]["final_loss"] < 100
    assert summary["data"]["classifier"]["train_rows"] > summary["data"]["classifier"]["labelled_rows"]


def test_born_again_trains_its_generations(tmp_path: Path) -> None:
    data = digits_recipe(tmp_path, {"name": "born_again", "gt_weights": [1.0, 0.5]}, teacher=None)
    data["train"]["steps"] = 10
    summary = run_recipe(parse_recipe(data))
    gens = tmp_path / "run" / "born-again" / "born_again" / "seed-0"
    assert sorted(p.name for p in gens.iterdir()) == ["generation-0", "generation-1"]
    assert summary["methods"]["born_again"]["after"]["accuracy"] > 0.2


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            {
                "method": {"name": "fitnet", "pairs": [{"student": "layers.0", "teacher": "block1"}]},
                "data": {"kind": "sbm"},
            },
            "graph teacher gives logits only",
        ),
        ({"student": {"arch": "gcn"}}, "student.arch"),
        (
            {
                "teacher": {"model": {"arch": "cnn"}, "ensemble": 2},
                "method": {"name": "rkd", "pairs": [{"student": "layers.0", "teacher": "block1"}]},
            },
            "teacher.ensemble",
        ),
        ({"method": {"name": "kd"}, "teacher": None}, "needs a teacher section"),
        ({"method": {"name": "vqgraph", "student_layer": "layers.0"}}, "data.kind must be a graph"),
        (
            {"method": {"name": "ce"}, "data": {"kind": "digits", "label_fraction": 0}},
            "data.digits.label_fraction",
        ),
    ],
)
def test_recipe_refusals(tmp_path: Path, change: dict, needle: str) -> None:
    data = digits_recipe(tmp_path, {"name": "kd"})
    data.update(change)
    if data.get("teacher") is None:
        data.pop("teacher")
    with pytest.raises(RecipeError, match=needle):
        parse_recipe(data)
