"""Bad classifier input: one line naming the field or file, exit 2, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from distill.classifier.models import build_model, model_config
from tests.classifier.recipes import digits_recipe
from tests.cli.test_errors import assert_one_line_error, run_cli, write


def test_module_path_that_does_not_exist_lists_nearest_names(tmp_path: Path) -> None:
    method = {"name": "fitnet", "pairs": [{"student": "layers.0", "teacher": "blok2"}]}
    res = run_cli("run", str(write(tmp_path, digits_recipe(tmp_path, method))))
    assert_one_line_error(res, "method.fitnet", "'blok2' not found in the teacher", "block2")


def test_projector_shape_mismatch(tmp_path: Path) -> None:
    method = {"name": "fitnet", "projector": "none", "pairs": [{"student": "layers.0", "teacher": "block2"}]}
    res = run_cli("run", str(write(tmp_path, digits_recipe(tmp_path, method))))
    assert_one_line_error(res, "method.", "pairs.0", "projector: none")


def test_attention_transfer_needs_maps(tmp_path: Path) -> None:
    method = {"name": "at", "pairs": [{"student": "layers.0", "teacher": "block2"}]}
    res = run_cli("run", str(write(tmp_path, digits_recipe(tmp_path, method))))
    assert_one_line_error(res, "no spatial extent")


def test_teacher_class_count_mismatch(tmp_path: Path) -> None:
    teacher = build_model("cnn", [1, 8, 8], 5, {"width": 4})
    folder = tmp_path / "teacher5"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model_config(teacher)))
    data = digits_recipe(tmp_path, {"name": "kd"})
    data["teacher"]["path"] = str(folder)
    res = run_cli("run", str(write(tmp_path, data)))
    assert_one_line_error(res, "teacher.path", "5 classes", "10")


def test_unknown_architecture_and_option(tmp_path: Path) -> None:
    data = digits_recipe(tmp_path, {"name": "ce"}, student={"arch": "transformer"})
    assert_one_line_error(
        run_cli("run", str(write(tmp_path, data))), "student", "unknown architecture 'transformer'"
    )
    data = digits_recipe(tmp_path, {"name": "ce"}, student={"arch": "mlp", "options": {"widht": 3}})
    assert_one_line_error(run_cli("run", str(write(tmp_path, data))), "student", "unknown option 'widht'")


def test_missing_data_file(tmp_path: Path) -> None:
    data = digits_recipe(tmp_path, {"name": "ce"})
    data["data"] = {"kind": "tensors", "path": str(tmp_path / "nope.safetensors")}
    assert_one_line_error(run_cli("validate", str(write(tmp_path, data))), "data.path", "nope.safetensors")


def test_tensor_file_without_labels(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"x": torch.zeros(20, 4)}, str(path))
    data = digits_recipe(tmp_path, {"name": "ce"})
    data["data"] = {"kind": "tensors", "path": str(path)}
    assert_one_line_error(run_cli("run", str(write(tmp_path, data))), "x.safetensors", "'y'")


def test_lm_only_commands_refuse_classifier_recipes(tmp_path: Path) -> None:
    data = digits_recipe(tmp_path, {"name": "ce"})
    assert_one_line_error(
        run_cli("cache", str(write(tmp_path, data))), "language-model recipes", "classifier"
    )


def test_validating_the_builtin_classifier_and_condense_recipes_loads_no_model_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from distill.recipe import load_recipe; "
        "[load_recipe(n).preflight() for n in ('digits-kd', 'graph-glnn', 'digits-condense')]; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
