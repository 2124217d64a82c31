"""Held-out KL on the student's own answers: each held-out prompt is completed by the student, the
teacher scores those tokens, and the usual per-token metrics are taken there. Training on the dataset's
text only ever shows the student prefixes it did not write; at inference it continues its own, and this
is where on-policy distillation claims its gain (Agarwal et al. 2024)."""

from __future__ import annotations

from typing import Any

import torch

from distill.configs.lm_sections import OwnSamplesEvalConfig
from distill.data.tokenize import TokenizedExample
from distill.eval.metrics import evaluate
from distill.generation.engine import generate_tokens
from distill.generation.sampling import SamplingSpec
from distill.teachers.live import LiveTeacherSource

PREFIX = "own_"
KEYS = ("kl", "reverse_kl", "top1_agreement", "tokens")


def own_sample_metrics(
    student: Any,
    teacher: LiveTeacherSource,
    examples: list[TokenizedExample],
    cfg: OwnSamplesEvalConfig,
    *,
    eos_ids: list[int],
    vocab_size: int,
    pad_id: int,
    batch_size: int,
    chunk_size: int,
) -> dict[str, Any]:
    """`own_kl`, `own_reverse_kl`, `own_top1_agreement`, `own_tokens` over the student's answers."""
    was_training = student.training
    student.eval()
    prompts = [ex.input_ids[: ex.prompt_len] for ex in examples]
    rows = generate_tokens(
        student,
        prompts,
        SamplingSpec(cfg.temperature, cfg.top_p),
        cfg.max_new_tokens,
        eos_ids,
        pad_id=pad_id,
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    student.train(was_training)
    own = [TokenizedExample(p + r.tokens, len(p)) for p, r in zip(prompts, rows, strict=True) if r.tokens]
    scores = evaluate(
        student,
        teacher,
        own,
        vocab_size=vocab_size,
        pad_id=pad_id,
        batch_size=batch_size,
        chunk_size=chunk_size,
    )
    return {PREFIX + k: scores[k] for k in KEYS}


def own_sample_columns() -> list[dict[str, str]]:
    """The LM results table with the own-sample KL beside the held-out-text one."""
    return [
        {"key": "kl", "title": "KL(t‖s) ↓", "format": "num", "better": "lower"},
        {"key": "own_kl", "title": "KL on own samples ↓", "format": "num", "better": "lower"},
        {"key": "reverse_kl", "title": "reverse KL ↓", "format": "num", "better": "lower"},
        {"key": "own_reverse_kl", "title": "reverse KL on own samples ↓", "format": "num", "better": "lower"},
        {"key": "top1_agreement", "title": "top-1 agreement ↑", "format": "pct", "better": "higher"},
        {"key": "student_nll", "title": "student NLL ↓", "format": "num", "better": "lower"},
    ]
