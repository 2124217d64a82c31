"""`distill prune`: the recipe's depth + width-pruned student saved as a plain folder, loadable with
from_pretrained, with the widths asked for and the teacher's weights in it."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tests.cli.test_errors import assert_one_line_error, run_cli, write
from tests.conftest import tiny_recipe


def test_prune_command_saves_a_plain_student(
    tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path
) -> None:
    rec = tiny_recipe(tiny_teacher_dir, prompts_file, tmp_path / "run")
    width = {"hidden_size": 24, "intermediate_size": 40, "num_attention_heads": 2, "num_key_value_heads": 2}
    rec["student"] = {"init": "prune", "prune": {"keep_layers": 3, "depth": "importance", "width": width}}
    res = run_cli("prune", str(write(tmp_path, rec)), "--output", str(tmp_path / "pruned"))
    assert res.returncode == 0, res.stderr
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    cfg = student.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (3, 24, 40)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 2, 8)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    # every kept embedding column is one of the teacher's columns
    t_cols = teacher.model.embed_tokens.weight[:50].T
    s_cols = student.model.embed_tokens.weight[:50].T
    assert all(any(torch.equal(c, t) for t in t_cols) for c in s_cols)
    with torch.no_grad():
        assert torch.isfinite(student(torch.tensor([[1, 5, 9]])).logits).all()


def test_prune_command_refuses_a_non_pruned_student(
    tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path
) -> None:
    rec = tiny_recipe(tiny_teacher_dir, prompts_file, tmp_path / "run")
    rec["student"] = {"init": "config", "config": {"num_hidden_layers": 2}}
    assert_one_line_error(
        run_cli("prune", str(write(tmp_path, rec)), "--output", str(tmp_path / "p")), "student.init"
    )
