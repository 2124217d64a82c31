"""`distill speculate`: the report (printed and JSON) on tiny models, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.cli.test_errors import assert_one_line_error, run_cli
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer_dir: Path) -> Path:
    """A 1-layer random Llama with the target's (SmolLM2's) tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_draft")
    tiny_llama(layers=1, seed=1).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(smol_tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def foreign_draft_dir(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer_dir: Path) -> Path:
    """A draft whose tokenizer has one token more than the target's."""
    folder = tmp_path_factory.mktemp("foreign_draft")
    tiny_llama(layers=1, seed=1).save_pretrained(folder, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    tok.add_tokens(["<not-in-the-target>"])
    tok.save_pretrained(folder)
    return folder


def test_report_prints_and_writes_json(
    tmp_path: Path, tiny_teacher_dir: Path, draft_dir: Path, prompts_file: Path
) -> None:
    out = tmp_path / "spec.json"
    res = run_cli(
        "speculate", "--target", str(tiny_teacher_dir), "--draft", str(draft_dir), "--prompts",
        str(prompts_file), "--limit", "2", "--max-new-tokens", "6", "--gamma", "3", "--repeats", "2",
        "--json", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    for needle in ("acceptance alpha", "per position", "tokens per target call", "cost ratio", "tokens/s",
                   "speed-up", "greedy outputs identical: yes (2/2 prompts)"):  # fmt: skip
        assert needle in res.stdout, res.stdout
    report = json.loads(out.read_text())
    for key in ("alpha", "alpha_per_position", "tokens_per_target_call", "cost_ratio", "speedup",
                "target_only_tokens_per_s", "speculative_tokens_per_s", "identical_outputs", "repeats"):  # fmt: skip
        assert key in report, key
    assert report["identical_outputs"] == 2 and len(report["repeats"]) == 2
    assert len(report["alpha_per_position"]) == 3
    assert report["speedup"]["min"] <= report["speedup"]["median"] <= report["speedup"]["max"]
    assert report["stats"]["verify_calls"] > 0 and report["stats"]["draft_seconds"] > 0


def test_bad_gamma(tiny_teacher_dir: Path, draft_dir: Path, prompts_file: Path) -> None:
    res = run_cli("speculate", "--target", str(tiny_teacher_dir), "--draft", str(draft_dir),
                  "--prompts", str(prompts_file), "--gamma", "0")  # fmt: skip
    assert_one_line_error(res, "--gamma")


def test_missing_prompts_file(tmp_path: Path, tiny_teacher_dir: Path, draft_dir: Path) -> None:
    res = run_cli("speculate", "--target", str(tiny_teacher_dir), "--draft", str(draft_dir),
                  "--prompts", str(tmp_path / "nope.jsonl"))  # fmt: skip
    assert_one_line_error(res, "--prompts", "nope.jsonl")


def test_draft_with_another_tokenizer(
    tiny_teacher_dir: Path, foreign_draft_dir: Path, prompts_file: Path
) -> None:
    res = run_cli("speculate", "--target", str(tiny_teacher_dir), "--draft", str(foreign_draft_dir),
                  "--prompts", str(prompts_file))  # fmt: skip
    assert_one_line_error(res, "--draft", "tokenizer")
