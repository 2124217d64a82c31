"""Cross-tokenizer distillation end to end on the tiny teacher: a student BPE trained on the training
text, transplanted embeddings, ALM / ULD / SFT, bits-per-byte evaluation, export, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from distill.pipeline import run_recipe
from distill.recipe import parse_recipe
from tests.cli.test_errors import assert_one_line_error, run_cli, write
from tests.conftest import tiny_recipe


def cross_recipe(tiny_teacher_dir: Path, prompts_file: Path, out: Path, **method: object) -> dict:
    recipe = tiny_recipe(tiny_teacher_dir, prompts_file, out)
    recipe["student"]["tokenizer"] = {"vocab_size": 300}
    recipe["data"]["max_length"] = 256  # a 300-entry BPE needs ~100 tokens for the chat header alone
    recipe["method"] = {"name": "cross_tokenizer_kd", "uld_weight": 0.5, **method}
    recipe["baselines"] = [{"name": "sft"}]
    return recipe


def test_cross_tokenizer_run(tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path) -> None:
    recipe = parse_recipe(cross_recipe(tiny_teacher_dir, prompts_file, tmp_path / "run"))
    summary = run_recipe(recipe)
    after = summary["methods"]["cross_tokenizer_kd"]["after"]
    before = summary["before"]
    for ev in (before, after):
        assert ev["bits_per_byte"] > 0 and ev["teacher_bits_per_byte"] > 0 and ev["chunk_kl"] >= 0
    assert after["teacher_bits_per_byte"] == pytest.approx(before["teacher_bits_per_byte"])
    assert summary["student"]["tokenizer"]["vocab"] == 300
    student = tmp_path / "run" / "methods" / "cross_tokenizer_kd" / "student"
    assert json.loads((student / "config.json").read_text())["vocab_size"] == 300
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student)
    assert len(tok) == 300
    model = AutoModelForCausalLM.from_pretrained(student)
    ids = tok("hello there", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == 300
