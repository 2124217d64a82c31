"""Held-out answer accuracy: the model answers each held-out task prompt greedily, the task's own verifier
scores the answer. The same verifiers that filtered the training data judge the students, so a number
here means what the factory's "verified" means."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from distill.data.reasoning_views import with_prefix
from distill.data.records import Example
from distill.data.tokenize import prompt_ids
from distill.generation.engine import generate_tokens
from distill.generation.sampling import SamplingSpec
from distill.progress import NullProgress, Progress
from distill.reasoning.verifiers import Verdict, get_verifier


@dataclass
class Answered:
    """One held-out prompt's answer and its verdict."""

    task: str
    text: str
    tokens: int
    verdict: Verdict


def verify_example(ex: Example, text: str, where: str, allow_unisolated: bool) -> Verdict:
    """Score `text` as the answer to `ex` with the verifier its row names."""
    verifier = get_verifier(
        str(ex.meta.get("verifier", "")), f"{where}: verifier", allow_unisolated=allow_unisolated
    )
    options = ex.meta.get("verify") or {}
    return verifier.verify(text, str(ex.meta.get("answer", "")), dict(options))


@torch.no_grad()
def answer_heldout(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    *,
    prefix: str = "",
    max_new_tokens: int = 128,
    batch_size: int = 16,
    system_prompt: str | None = None,
    allow_unisolated: bool = False,
    progress: Progress | None = None,
) -> list[Answered]:
    """Greedy answers to every held-out prompt, each with its verdict."""
    model.eval()
    prompts = [prompt_ids(tokenizer, with_prefix(ex.prompt, prefix), system_prompt) for ex in examples]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = generate_tokens(
        model,
        prompts,
        SamplingSpec(temperature=0.0),
        max_new_tokens,
        [eos] if eos is not None else [],
        pad_id=int(pad or 0),
        batch_size=batch_size,
        progress=progress or NullProgress(),
        label="answering held-out prompts",
    )
    out = []
    for i, (ex, row) in enumerate(zip(examples, rows, strict=True)):
        text = str(tokenizer.decode(row.tokens, skip_special_tokens=True)).strip()
        verdict = verify_example(ex, text, f"held-out prompt {i}", allow_unisolated)
        out.append(Answered(str(ex.meta.get("task", "all")), text, len(row.tokens), verdict))
    return out


def accuracy_metrics(answers: list[Answered]) -> dict[str, float]:
    """Accuracy overall and per task, the share of answers with a readable final answer, and the mean
    answer length in tokens."""
    if not answers:
        return {}
    by_task: dict[str, list[bool]] = defaultdict(list)
    for a in answers:
        by_task[a.task].append(a.verdict.correct)
    n = len(answers)
    metrics = {
        "accuracy": sum(a.verdict.correct for a in answers) / n,
        "answered": sum(a.verdict.extracted is not None for a in answers) / n,
        "mean_output_tokens": sum(a.tokens for a in answers) / n,
    }
    for task, right in sorted(by_task.items()):
        metrics[f"accuracy/{task}"] = sum(right) / len(right)
    return metrics


def accuracy_columns(tasks: list[str]) -> list[dict[str, str]]:
    """The report's columns for `accuracy_metrics`."""
    cols = [{"key": "accuracy", "title": "accuracy", "format": "pct", "better": "higher"}]
    if len(tasks) > 1:
        cols += [
            {"key": f"accuracy/{t}", "title": f"acc. {t}", "format": "pct", "better": "higher"} for t in tasks
        ]
    cols += [
        {"key": "answered", "title": "has answer", "format": "pct", "better": "higher"},
        {"key": "mean_output_tokens", "title": "mean length (tokens)", "format": "num", "better": "lower"},
    ]
    return cols
