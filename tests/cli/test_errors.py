"""Bad input gives one line naming the field or file, exit code 2, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_llama, tiny_recipe


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True, timeout=600)


def assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr  # progress lines may come before it
    for n in needles:
        assert n in errors[0], errors[0]


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture
def good(tmp_path: Path, prompts_file: Path) -> dict:
    return tiny_recipe(tmp_path / "teacher", prompts_file, tmp_path / "out")


def test_validate_ok(tmp_path: Path, good: dict, tiny_teacher_dir: Path) -> None:
    good["teacher"]["model"]["path"] = str(tiny_teacher_dir)
    res = run_cli("validate", str(write(tmp_path, good)))
    assert res.returncode == 0 and "ok" in res.stdout


def test_validate_loads_no_model_library(tmp_path: Path, good: dict, tiny_teacher_dir: Path) -> None:
    good["teacher"]["model"]["path"] = str(tiny_teacher_dir)
    code = (
        "import sys; from distill.recipe import load_recipe, preflight; "
        f"preflight(load_recipe({str(write(tmp_path, good))!r})); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_key(tmp_path: Path, good: dict) -> None:
    good["train"]["learning_rate"] = 1
    assert_one_line_error(run_cli("validate", str(write(tmp_path, good))), "train.learning_rate", "unknown key")


def test_wrong_type(tmp_path: Path, good: dict) -> None:
    assert_one_line_error(run_cli("validate", str(write(tmp_path, good)), "--set", "train.steps=lots"), "train.steps")


def test_missing_recipe_file(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("validate", str(tmp_path / "nope.yaml")), "nope.yaml")


def test_missing_data_file(tmp_path: Path, good: dict, tiny_teacher_dir: Path) -> None:
    good["teacher"]["model"]["path"] = str(tiny_teacher_dir)
    good["data"]["train"]["path"] = str(tmp_path / "missing.jsonl")
    assert_one_line_error(run_cli("run", str(write(tmp_path, good))), "missing.jsonl")


def test_missing_teacher_folder(tmp_path: Path, good: dict) -> None:
    assert_one_line_error(run_cli("run", str(write(tmp_path, good))), str(tmp_path / "teacher"))


def test_bad_jsonl_line(tmp_path: Path, good: dict, tiny_teacher_dir: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{not json\n')
    good["teacher"]["model"]["path"] = str(tiny_teacher_dir)
    good["data"]["train"]["path"] = str(bad)
    assert_one_line_error(run_cli("run", str(write(tmp_path, good))), "bad.jsonl line 2")


def test_vocabulary_mismatch(tmp_path: Path, good: dict, tiny_teacher_dir: Path) -> None:
    from transformers import AutoTokenizer

    other = tmp_path / "other_student"
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    tok.add_tokens(["<extra_token_a>", "<extra_token_b>"])
    tiny_llama(vocab=49160).save_pretrained(other)
    tok.save_pretrained(other)
    good["teacher"]["model"]["path"] = str(tiny_teacher_dir)
    good["student"] = {"init": "pretrained", "model": {"path": str(other)}}
    good["baselines"] = []
    assert_one_line_error(run_cli("run", str(write(tmp_path, good))), "tokenizers differ", "cross-tokenizer")
