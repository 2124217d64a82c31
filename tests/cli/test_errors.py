"""Bad input gives one line naming the field or file, exit code 2, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_llama, tiny_recipe


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True, timeout=600
    )


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
    assert_one_line_error(
        run_cli("validate", str(write(tmp_path, good))), "train.learning_rate", "unknown key"
    )


def test_wrong_type(tmp_path: Path, good: dict) -> None:
    assert_one_line_error(
        run_cli("validate", str(write(tmp_path, good)), "--set", "train.steps=lots"), "train.steps"
    )


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
    res = run_cli("run", str(write(tmp_path, good)))
    assert_one_line_error(res, "method.name", "tokenizers differ", "cross_tokenizer_kd")
    assert_no_progress_bar(res.stderr)  # two models were loaded with stderr to a pipe


# ---------------------------------------------------------------- files the OS or the decoder refuses


def test_binary_recipe_file(tmp_path: Path) -> None:
    p = tmp_path / "binary.yaml"
    p.write_bytes(b"\xff\xfe\x00garbage")
    assert_one_line_error(run_cli("validate", str(p)), "binary.yaml", "UTF-8")


def test_recipe_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "folder.yaml").mkdir()
    assert_one_line_error(run_cli("validate", str(tmp_path / "folder.yaml")), "folder.yaml", "folder")


def test_recipe_path_too_long_for_the_os(tmp_path: Path) -> None:
    res = run_cli("validate", str(tmp_path / ("a" * 5000)))
    assert_one_line_error(res, "recipe", "characters")
    assert len(res.stderr) < 600  # the 5,000-character name is shortened, not printed whole


def test_data_path_too_long_for_the_os(tmp_path: Path, good: dict, tiny_teacher_dir: Path) -> None:
    good["teacher"]["model"]["path"] = str(tiny_teacher_dir)
    good["data"]["train"]["path"] = str(tmp_path / ("d" * 5000))
    assert_one_line_error(run_cli("validate", str(write(tmp_path, good))), "data.train.path")


def test_model_path_too_long_for_the_os(tmp_path: Path, good: dict) -> None:
    good["teacher"]["model"]["path"] = str(tmp_path / ("m" * 5000))
    assert_one_line_error(run_cli("validate", str(write(tmp_path, good))), "teacher.model.path")


def test_package_path_of_a_missing_dotted_package(tmp_path: Path, good: dict) -> None:
    good["data"]["train"]["path"] = "pkg:no_such_pkg.sub/train.jsonl"
    assert_one_line_error(
        run_cli("validate", str(write(tmp_path, good))), "pkg:no_such_pkg.sub", "not installed"
    )


def test_override_past_the_end_of_a_list(tmp_path: Path, good: dict) -> None:
    res = run_cli("validate", str(write(tmp_path, good)), "--set", "baselines.4.name=sft")
    assert_one_line_error(res, "baselines.4.name")


def test_output_dir_with_an_unknown_placeholder(tmp_path: Path, good: dict) -> None:
    good["output_dir"] = "runs/{nmae}"
    assert_one_line_error(run_cli("validate", str(write(tmp_path, good))), "output_dir", "{name}")


# ---------------------------------------------------------------- the teacher's size, before any model loads


@pytest.mark.parametrize(
    ("setting", "needles"),
    [
        (
            "student.prune.keep_layers=40",
            ("student.prune.keep_layers", "40 is more than the teacher's 30 layers"),
        ),
        ("cache.k=70000", ("cache.k", "70000 is above the teacher's vocabulary (49152 tokens)")),
    ],
)
def test_quickstart_teacher_size_checked_at_validation(setting: str, needles: tuple[str, ...]) -> None:
    assert_one_line_error(run_cli("validate", "quickstart", "--set", setting), *needles)


def test_prune_beyond_the_teacher_stops_before_generation(
    tmp_path: Path, good: dict, tiny_teacher_dir: Path
) -> None:
    good["teacher"]["model"]["path"] = str(tiny_teacher_dir)
    good["student"]["prune"] = {"layers": [0, 4]}  # the tiny teacher has layers 0-3
    assert_one_line_error(run_cli("run", str(write(tmp_path, good))), "student.prune.layers", "[4]")
    assert not Path(good["data"]["generate"]["store"]).exists(), "the teacher generated before the check"


def test_bad_student_config_names_the_field() -> None:
    from distill.errors import RecipeError
    from distill.models.student import build_student
    from distill.recipe import StudentConfig

    with pytest.raises(RecipeError, match="student.config"):
        build_student(StudentConfig(init="config", config={"model_type": "no_such_architecture"}), None)
    bad_heads = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 5, "vocab_size": 64}
    with pytest.raises(RecipeError, match="student.config"):
        build_student(StudentConfig(init="config", config=bad_heads), None)


# ---------------------------------------------------------------- library noise: the CLI's job, not the loader's


def assert_no_progress_bar(text: str) -> None:
    assert "it/s" not in text and "%|" not in text and "s/it" not in text, text[-2000:]


def test_validate_prints_no_library_bar() -> None:
    res = run_cli("validate", "quickstart")
    assert res.returncode == 0, res.stderr
    assert_no_progress_bar(res.stderr)


def test_configure_libraries_turns_bars_off_when_stderr_is_not_a_terminal() -> None:
    code = (
        "from distill.cli import _configure_libraries; _configure_libraries()\n"
        "from transformers.utils import logging\n"
        "assert not logging.is_progress_bar_enabled()\n"
        "from tqdm.auto import tqdm\n"
        "sum(1 for _ in tqdm(range(50), desc='a library bar'))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert_no_progress_bar(res.stderr)


def test_loading_a_model_changes_no_process_state(tiny_teacher_dir: Path) -> None:
    import logging
    import os

    from transformers.utils import logging as hf_logging

    from distill.models.loading import load_model
    from distill.recipe import ModelConfig

    before = (dict(os.environ), hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    level = logging.getLogger("transformers").level
    loaded = load_model(ModelConfig(path=str(tiny_teacher_dir)))
    assert loaded.model.config.num_hidden_layers == 4
    assert (dict(os.environ), hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before
    assert logging.getLogger("transformers").level == level
