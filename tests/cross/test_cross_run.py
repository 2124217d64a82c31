"""Cross-tokenizer distillation end to end on the tiny teacher: a student BPE trained on the training
text, transplanted embeddings, ALM / ULD / SFT, bits-per-byte evaluation, export, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


# ---------------------------------------------------------------- bad input: one line naming the field


# `validate` catches what the recipe alone shows (no model loads); `run` what needs the tokenizers
BAD_INPUT = {
    "vocab-too-small": (
        "run",
        lambda r: r["student"].update(tokenizer={"vocab_size": 10}),
        ["student.tokenizer.vocab_size"],
    ),
    "same-tokenizer": (
        "validate",
        lambda r: r["student"].pop("tokenizer"),
        ["method.name", "student.tokenizer"],
    ),
    "same-tokenizer-baseline": (
        "validate",
        lambda r: (
            r["student"].pop("tokenizer"),
            r.update(method={"name": "logit_kd"}, baselines=[{"name": "cross_tokenizer_kd"}]),
        ),
        ["baselines.0.name", "cross_tokenizer_kd"],
    ),
    "path-and-size": (
        "validate",
        lambda r: r["student"].update(tokenizer={"vocab_size": 300, "path": {"path": "x"}}),
        ["student.tokenizer", "exactly one"],
    ),
    "logit-kd": (
        "validate",
        lambda r: r.update(method={"name": "logit_kd"}),
        ["method.name", "logit_kd", "cross_tokenizer_kd"],
    ),
    "baseline": (
        "validate",
        lambda r: r.update(baselines=[{"name": "logit_kd", "divergence": "tvd"}]),
        ["baselines.0.name", "logit_kd"],
    ),
    "packing": ("validate", lambda r: r["data"].update(packing=True), ["data.packing"]),
    "no-weight": (
        "validate",
        lambda r: r["method"].update(alm_weight=0, uld_weight=0),
        ["method", "every loss weight is 0"],
    ),
    "divergence": (
        "validate",
        lambda r: r["method"].update(alm_divergence="kl"),
        ["method.cross_tokenizer_kd.alm_divergence", "binary_kl"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line(tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path, case: str) -> None:
    command, change, needles = BAD_INPUT[case]
    recipe = cross_recipe(tiny_teacher_dir, prompts_file, tmp_path / "run")
    change(recipe)  # type: ignore[operator]
    assert_one_line_error(run_cli(command, str(write(tmp_path, recipe))), *needles)  # type: ignore[arg-type]
    assert not (tmp_path / "run" / "methods").exists()


def test_sparse_teacher_terms_equal_dense_when_k_covers_the_vocabulary() -> None:
    """A served or cached teacher (top-k log-probs) gives the same ALM and ULD inputs as the live one
    when its k is the whole vocabulary; with a small k, tokens outside it are counted."""
    import torch

    from distill.methods.lm.cross_tokenizer_kd import teacher_terms
    from distill.teachers.base import SparseTeacherSignal, TeacherSignal

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 11, generator=gen, dtype=torch.float64).float() * 2
    targets = torch.tensor([0, 3, 5, 10, 2, 2, 7])
    first = torch.tensor([0, 2, 5])
    dense = teacher_terms(TeacherSignal(lambda s, e: logits[s:e].clone(), 7, 11), targets, first, 1.0, 3)
    logp = torch.log_softmax(logits, -1)
    top = torch.sort(logp, -1, descending=True)
    full = SparseTeacherSignal(top.indices, top.values, 1.0, 11)
    sparse = teacher_terms(full, targets, first, 1.0, 3)
    torch.testing.assert_close(sparse.token_logp, dense.token_logp)
    torch.testing.assert_close(sparse.sorted_probs, dense.sorted_probs)
    assert sparse.tail is not None and float(sparse.tail.abs().max()) < 1e-5 and sparse.missing == 0
    small = teacher_terms(
        SparseTeacherSignal(top.indices[:, :2], top.values[:, :2], 1.0, 11), targets, first, 1.0, 3
    )
    outside = int(sum(int(t) not in top.indices[i, :2].tolist() for i, t in enumerate(targets)))
    assert small.missing == outside > 0
    assert small.sorted_probs.shape == (3, 2)
    torch.testing.assert_close(small.sorted_probs + 0, dense.sorted_probs[:, :2])


def test_dense_teacher_cut_to_the_student_vocabulary_keeps_uld_exact() -> None:
    """ULD against a dense teacher keeps only its top-|V_student| probabilities and a tail: the same value
    as the full sorted vector (entries past the student's vocabulary face zeros either way)."""
    import torch

    from distill.losses.cross_tokenizer import uld_loss
    from distill.methods.lm.cross_tokenizer_kd import teacher_terms
    from distill.teachers.base import TeacherSignal

    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(6, 40, generator=gen) * 3
    student = torch.randn(3, 9, generator=gen, requires_grad=True)
    targets, first = torch.arange(6), torch.tensor([0, 1, 4])
    signal = TeacherSignal(lambda s, e: teacher[s:e].clone(), 6, 40)
    full = teacher_terms(signal, targets, first, 2.0, 4)
    cut = teacher_terms(signal, targets, first, 2.0, 4, top=9)
    assert full.tail is None and cut.tail is not None and cut.sorted_probs.shape == (3, 9)
    torch.testing.assert_close(
        uld_loss(student, cut.sorted_probs, cut.tail, 2.0), uld_loss(student, full.sorted_probs, None, 2.0)
    )
    assert teacher_terms(signal, targets, first, 2.0, 4, top=0).sorted_probs.shape == (3, 0)


def test_fresh_rows_instead_of_transplanted(smol_tokenizer_dir: Path) -> None:
    """`transplant: false`: the new vocabulary gets seeded random rows (the control for transplantation)."""
    import torch
    from transformers import AutoTokenizer

    from distill.configs.lm_sections import StudentTokenizerConfig
    from distill.families.lm_cross import adapt_student
    from distill.models.tokenizer_transplant import train_bpe
    from tests.conftest import tiny_llama

    teacher_tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    new = train_bpe(
        ["hello world, a test of the new tokenizer"] * 20 + ["naïve café"] * 5, 300, like=teacher_tok
    )
    rows = {}
    for transplant, seed in ((True, 0), (False, 0), (False, 0), (False, 1)):
        student = tiny_llama(layers=1)
        info = adapt_student(
            student, StudentTokenizerConfig(vocab_size=300, transplant=transplant), teacher_tok, new, seed
        )
        assert info["tokenizer"]["vocab"] == len(new) and student.get_input_embeddings().weight.shape[
            0
        ] == len(new)
        assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
        rows.setdefault((transplant, seed), []).append(student.get_input_embeddings().weight.detach().clone())
    fresh = rows[(False, 0)]
    assert torch.equal(fresh[0], fresh[1]) and not torch.equal(fresh[0], rows[(False, 1)][0])
    assert not torch.allclose(fresh[0], rows[(True, 0)][0])
    assert abs(float(fresh[0].std()) - 0.02) < 0.005
