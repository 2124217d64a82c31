"""The diffusion family end to end on a tiny toy: teacher trained and stored, a student distilled,
sampled and scored beside the teacher's same-step baselines, exported as a reloadable diffusers folder;
and the one-line refusals of bad recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.diffusion.data import DiffusionData, load_data
from distill.diffusion.teacher import load_saved
from distill.pipeline import run_recipe
from distill.recipe import parse_recipe
from distill.recipe_diffusion import ToyDataConfig
from tests.cli.test_errors import assert_one_line_error, run_cli, write


def tiny(tmp_path: Path, method: dict, **over: object) -> dict:
    recipe = {
        "name": "tiny-diffusion",
        "output_dir": str(tmp_path / "out"),
        "data": {"kind": "toy", "shape": "ring8", "train_size": 256, "test_size": 128, "batch_size": 64},
        "teacher": {"steps": 40, "store": str(tmp_path / "teachers"), "model": {"hidden": 32, "layers": 1},
                    "sampler": {"kind": "heun", "steps": 4}},
        "method": method,
        "train": {"steps": 6, "lr": 1e-3, "threads": 1},
        "eval": {"samples": 64, "teacher_steps": [1, 2]},
    }  # fmt: skip
    recipe.update(over)
    return recipe


def test_run_trains_the_teacher_once_and_reports_against_its_baselines(tmp_path: Path) -> None:
    recipe = parse_recipe(tiny(tmp_path, {"name": "denoise", "steps": 2, "init": "teacher"}))
    summary = run_recipe(recipe)
    refs = summary["references"]
    assert {"teacher, 1 Euler step", "teacher, 2 Euler steps", "training data (floor)"} <= set(refs)
    after = summary["methods"]["denoise"]["after"]
    assert {"swd", "mmd", "swd_teacher", "modes_covered", "on_mode", "steps", "samples_per_s"} <= set(after)
    assert after["steps"] == 2
    stored = list((tmp_path / "teachers").iterdir())
    assert len(stored) == 1 and (stored[0] / "model" / "noise_path.json").exists()
    student = next((tmp_path / "out" / "methods" / "denoise").glob("**/student"))
    assert (student / "samples.safetensors").exists() and (student / "config.json").exists()
    data = load_data(ToyDataConfig(train_size=256, test_size=128), 0)
    reloaded = load_saved(student, data, recipe_path(recipe), "student")
    x, t = torch.randn(3, 2), torch.full((3,), 0.5)
    assert reloaded.x0(x, t).shape == (3, 2)
    # a second run reuses the stored teacher (no new fingerprint folder, no retraining log)
    run_recipe(parse_recipe(tiny(tmp_path, {"name": "denoise", "steps": 1}, output_dir=str(tmp_path / "o2"))))
    assert len(list((tmp_path / "teachers").iterdir())) == 1


def recipe_path(recipe: object):  # noqa: ANN201 - test helper
    from distill.diffusion.paths import NoisePath

    return NoisePath(recipe.teacher.objective)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("method", "needle"),
    [
        ({"name": "denoise", "steps": 0}, "method.denoise.steps"),
        ({"name": "progressive", "steps": 1, "start_steps": 6}, "start_steps"),
        ({"name": "dmd2", "t_min": 0.9, "t_max": 0.5}, "t_min"),
    ],
)
def test_bad_method_settings_are_one_line(tmp_path: Path, method: dict, needle: str) -> None:
    assert_one_line_error(run_cli("validate", str(write(tmp_path, tiny(tmp_path, method)))), needle)


def test_guidance_distillation_needs_conditional_data(tmp_path: Path) -> None:
    res = run_cli("validate", str(write(tmp_path, tiny(tmp_path, {"name": "cfg_distill"}))))
    assert_one_line_error(res, "method", "class-conditional")


def test_a_teacher_trained_on_another_noise_path_is_refused(tmp_path: Path) -> None:
    run_recipe(parse_recipe(tiny(tmp_path, {"name": "denoise", "steps": 1})))
    folder = next((tmp_path / "teachers").iterdir()) / "model"
    facts = json.loads((folder / "noise_path.json").read_text())
    assert facts["path"]["kind"] == "flow"
    recipe = tiny(tmp_path, {"name": "denoise", "steps": 1}, output_dir=str(tmp_path / "o3"))
    recipe["teacher"] = {"path": str(folder), "objective": "edm"}
    res = run_cli("run", str(write(tmp_path, recipe)))
    assert_one_line_error(res, "teacher.objective", "'flow'", "'edm'")


def test_missing_teacher_folder_and_student_architecture_conflict(tmp_path: Path) -> None:
    recipe = tiny(tmp_path, {"name": "denoise"})
    recipe["teacher"] = {"path": str(tmp_path / "nowhere")}
    assert_one_line_error(run_cli("run", str(write(tmp_path, recipe))), "teacher.path")
    recipe = tiny(tmp_path, {"name": "denoise", "init": "teacher"}, student={"model": {"hidden": 16}})
    assert_one_line_error(run_cli("validate", str(write(tmp_path, recipe))), "method.init")


def test_digits_data_is_conditional_and_scaled() -> None:
    from distill.recipe_diffusion import DigitsDiffusionDataConfig

    d: DiffusionData = load_data(DigitsDiffusionDataConfig(), 0)
    assert d.shape == (1, 8, 8) and d.classes == 10
    assert float(d.x.min()) == -1.0 and float(d.x.max()) == 1.0
    assert len(d.x) + len(d.x_test) == 1797
    assert set(d.y_test.tolist()) == set(range(10))
