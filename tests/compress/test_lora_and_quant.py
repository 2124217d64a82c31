"""LoRA students and quantized students through whole runs on the tiny teacher: only adapters train, the
merged export loads with from_pretrained and computes what the unmerged model did; QAD exports integer-grid
weights; PTQ is evaluated rounded; bad settings are one-line errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.configs.compress import LoraConfig
from distill.errors import RecipeError
from distill.families.lm import LMFamily
from distill.methods.lm.base import LMMethod
from distill.models.lora import add_lora, merged_copy
from distill.pipeline import run_recipe
from distill.recipe import parse_recipe
from tests.cli.test_errors import assert_one_line_error, run_cli, write
from tests.conftest import tiny_llama, tiny_recipe


def test_lora_merge_matches_unmerged_logits() -> None:
    model = tiny_llama(vocab=64, layers=2, seed=3)
    counts = add_lora(model, LoraConfig(r=4, alpha=8))
    assert 0 < counts["trainable_parameters"] < counts["parameters"] / 3
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # adapters as training leaves them: small, not zero
    ids = torch.randint(0, 64, (2, 9))
    merged = merged_copy(model)
    assert not any("lora" in k for k in merged.state_dict())
    assert torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-5)


def test_lora_target_must_exist() -> None:
    with pytest.raises(RecipeError, match=r"^student.lora.targets: the student has no module named 'w_q'"):
        add_lora(tiny_llama(vocab=64, layers=1), LoraConfig(targets=["w_q"]))


def _run(tmp: Path, teacher: Path, prompts: Path, **over: object) -> tuple[dict, Path]:
    rec = tiny_recipe(teacher, prompts, tmp / "run", baselines=[])
    rec.update(over)
    return run_recipe(parse_recipe(rec)), tmp / "run" / "methods"


def test_lora_run_trains_adapters_only_and_exports_both_ways(
    tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path
) -> None:
    student = {"init": "prune", "prune": {"keep_layers": 2}, "lora": {"r": 4, "merge": True}}
    summary, methods = _run(tmp_path, tiny_teacher_dir, prompts_file, student=student)
    exported = AutoModelForCausalLM.from_pretrained(methods / "logit_kd" / "student")
    assert not any("lora" in k for k in exported.state_dict())
    assert summary["student"]["lora"]["trainable_parameters"] > 0
    # the adapter folder variant: base + peft adapter reproduce the merged model
    student["lora"]["merge"] = False
    _run(tmp_path / "b", tiny_teacher_dir, prompts_file, student=student)
    import peft

    folder = tmp_path / "b" / "run" / "methods" / "logit_kd" / "student"
    base = AutoModelForCausalLM.from_pretrained(folder)
    with_adapter = peft.PeftModel.from_pretrained(base, folder / "adapter")
    ids = torch.randint(0, 1000, (1, 7))
    assert torch.allclose(
        with_adapter(ids).logits, exported(ids).logits, atol=1e-5
    )  # same seed, same training


def _grid_values(w: torch.Tensor, group: int) -> int:
    return max(int(g.unique().numel()) for g in w.reshape(-1, group))


def test_qad_exports_integer_grid_weights_and_ptq_rounds_at_eval(
    tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path
) -> None:
    method = {"name": "logit_kd", "quantize": {"bits": 4, "group_size": 16, "mode": "qat"}}
    baselines = [
        {"name": "logit_kd", "label": "ptq", "quantize": {"bits": 4, "group_size": 16, "mode": "ptq"}}
    ]
    _, methods = _run(tmp_path, tiny_teacher_dir, prompts_file, method=method, baselines=baselines)
    for label in ("logit_kd", "ptq"):
        model = AutoModelForCausalLM.from_pretrained(methods / label / "student")
        q = model.model.layers[0].self_attn.q_proj.weight.detach()
        assert _grid_values(q, 16) <= 16, label
        assert _grid_values(model.model.embed_tokens.weight.detach()[:64], 32) > 16  # embeddings stay float


def test_ptq_eval_model_is_rounded_copy(tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path) -> None:
    from accelerate import Accelerator

    from distill.progress import NullProgress

    rec = tiny_recipe(tiny_teacher_dir, prompts_file, tmp_path / "run", baselines=[])
    rec["method"] = {"name": "logit_kd", "quantize": {"bits": 4, "group_size": 16, "mode": "ptq"}}
    fam = LMFamily()
    recipe = parse_recipe(rec)
    fam.prepare(recipe, Accelerator(cpu=True), NullProgress())
    method = fam.make_method(recipe.method, 0)
    assert isinstance(method, LMMethod)
    before = copy.deepcopy(method.body.lm.state_dict())
    rounded = method.eval_model()
    assert rounded is not method.body.lm
    assert all(
        torch.equal(before[k], v) for k, v in method.body.lm.state_dict().items()
    )  # training copy untouched
    w = rounded.model.layers[0].mlp.up_proj.weight.detach()
    assert _grid_values(w, 16) <= 16


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        (
            {"student": {"init": "prune", "prune": {"keep_layers": 2}, "lora": {"targets": ["w_q"]}}},
            ("student.lora.targets", "w_q"),
        ),
        (
            {"student": {"init": "prune", "prune": {"keep_layers": 2, "width": {"intermediate_size": 4096}}}},
            ("student.prune.width.intermediate_size", "larger than the teacher"),
        ),
        ({"method": {"name": "logit_kd", "quantize": {"group_size": 48}}}, ("method.quantize.group_size",)),
        (
            {
                "student": {"init": "prune", "prune": {"keep_layers": 2}, "lora": {}},
                "method": {"name": "logit_kd", "quantize": {}},
            },
            ("method.quantize", "LoRA"),
        ),
    ],
)
def test_bad_compression_settings_are_one_line(
    tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path, change: dict, needles: tuple[str, ...]
) -> None:
    rec = tiny_recipe(tiny_teacher_dir, prompts_file, tmp_path / "run", baselines=[])
    rec.update(change)
    assert_one_line_error(run_cli("run", str(write(tmp_path, rec))), *needles)
