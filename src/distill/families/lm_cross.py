"""The LM family when teacher and student tokenize differently: the student's tokenizer (loaded, or a
byte-level BPE trained on the training text), its embeddings (transplanted from the teacher's pieces, or
fresh), which methods can run, and the tokenizer-agnostic evaluation columns."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.configs.lm import tokenizer_misfit
from distill.configs.lm_sections import StudentTokenizerConfig
from distill.data.records import Example
from distill.errors import RecipeError
from distill.models.loading import load_tokenizer, tokenizer_fingerprint
from distill.recipe import Recipe


def differ(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase) -> bool:
    return tokenizer_fingerprint(teacher_tok) != tokenizer_fingerprint(student_tok)


def check_methods(recipe: Recipe, tokenizers_differ: bool) -> None:
    """Every method of the recipe fits the tokenizers as loaded: one line naming the field if not."""
    for field, m in zip(recipe.method_fields(), recipe.methods(), strict=True):
        misfit = tokenizer_misfit(field, m.name, tokenizers_differ)
        if misfit is not None:
            raise RecipeError(misfit)


def training_texts(examples: list[Example]) -> list[str]:
    """What a student BPE learns from: every message and answer of the training set."""
    texts: list[str] = []
    for ex in examples:
        texts.extend(m["content"] for m in ex.prompt)
        if ex.completion:
            texts.append(ex.completion)
    return texts


def student_tokenizer(
    cfg: StudentTokenizerConfig, teacher_tok: PreTrainedTokenizerBase, train: list[Example], seed: int
) -> PreTrainedTokenizerBase:
    if cfg.path is not None:
        return load_tokenizer(cfg.path)
    from distill.models.tokenizer_transplant import train_bpe

    assert cfg.vocab_size is not None
    return train_bpe(training_texts(train), cfg.vocab_size, like=teacher_tok, seed=seed)


def adapt_student(
    student: PreTrainedModel,
    cfg: StudentTokenizerConfig,
    teacher_tok: PreTrainedTokenizerBase,
    tok: PreTrainedTokenizerBase,
    seed: int,
) -> dict[str, Any]:
    """Give a student built from the teacher the new vocabulary: transplanted rows, or fresh ones drawn
    like a new model's (seeded)."""
    from distill.models.tokenizer_transplant import transplant_embeddings

    counts = transplant_embeddings(student, teacher_tok, tok)
    if not cfg.transplant:
        std = float(getattr(student.config, "initializer_range", 0.02))
        gen = torch.Generator().manual_seed(seed)
        layers = {id(m): m for m in (student.get_input_embeddings(), student.get_output_embeddings())}
        with torch.no_grad():
            for layer in layers.values():
                weight = layer.weight if layer is not None else None
                if isinstance(weight, torch.Tensor):
                    weight.copy_(torch.randn(tuple(weight.shape), generator=gen) * std)
        counts = {"tokens": len(tok), "fresh": len(tok)}
    return {"tokenizer": {"vocab": len(tok), "transplant": cfg.transplant, **counts}}


def result_columns(with_teacher: bool) -> list[dict[str, str]]:
    cols = [{"key": "bits_per_byte", "title": "bits/byte", "format": "num", "better": "lower"}]
    if with_teacher:
        cols += [
            {
                "key": "excess_bits_per_byte",
                "title": "bits/byte over teacher",
                "format": "num",
                "better": "lower",
            },
            {"key": "chunk_kl", "title": "chunk KL", "format": "num", "better": "lower"},
        ]
    return cols


def results_note(n: int, with_teacher: bool) -> str:
    note = (
        f"measured on {n} held-out answers, independently of either tokenizer: the student's negative "
        "log-likelihood of the teacher's answers (end token included) in bits per UTF-8 byte"
    )
    if with_teacher:
        note += (
            "; the same minus the teacher's own; and the mean binary KL between teacher and student "
            "likelihoods of the character-aligned chunks of each answer"
        )
    return note
