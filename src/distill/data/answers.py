"""The teacher's answers to training and held-out prompts (sequence-KD data): generated once, through
the server for a served teacher or locally, and stored by a fingerprint of what made them, so every run
(and `distill cache`) with the same prompts, teacher and settings shares them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from distill.data.generate import generate_completions
from distill.data.records import Example, read_examples
from distill.data.tokenize import prompt_ids
from distill.errors import RecipeError
from distill.io import write_jsonl_atomic
from distill.progress import Progress
from distill.recipe import GenerateConfig, Recipe
from distill.teachers.factory import TeacherHandle, teacher_ident


def example_row(ex: Example) -> dict[str, Any]:
    row: dict[str, Any] = {"messages": [*ex.prompt, {"role": "assistant", "content": ex.completion or ""}]}
    row["finished"] = ex.finished
    return row


def teacher_answers(
    recipe: Recipe,
    teacher: TeacherHandle,
    examples: list[Example],
    progress: Progress,
    gen: GenerateConfig | None = None,
) -> list[Example]:
    """The teacher's answer to every prompt: through the server for a served teacher, else locally."""
    gen = gen or recipe.data.generate or GenerateConfig()
    system = recipe.data.system_prompt
    if teacher.kind == "served" and teacher.remote is not None:
        prompts = [prompt_ids(teacher.tokenizer, ex.prompt, system) for ex in examples]
        progress.start("teacher generating (server)", None)
        outs = teacher.remote.generate(  # type: ignore[attr-defined]
            prompts, gen.max_new_tokens, gen.temperature if gen.do_sample else 0.0, gen.top_p, recipe.seed
        )
        progress.finish()
        return [
            replace(ex, completion=o.text.strip(), finished=o.finished)
            for ex, o in zip(examples, outs, strict=True)
        ]
    if teacher.model is None:
        raise RecipeError(
            "data.generate: generation needs the teacher's weights (a live teacher or a local copy)"
        )
    return generate_completions(
        teacher.model,
        teacher.tokenizer,
        examples,
        gen,
        system_prompt=system,
        seed=recipe.seed,
        progress=progress,
    )


def generated_path(recipe: Recipe, teacher_ident: str, split: str, examples: list[Example]) -> Path:
    """Where the teacher's answers to `examples` are stored: under data.generate.store, keyed by a
    fingerprint of what made them (prompts, generation settings, system prompt, teacher, seed)."""
    assert recipe.data.generate is not None
    gen = recipe.data.generate.model_dump()
    gen.pop("store")
    key = json.dumps(
        {
            "prompts": [ex.prompt for ex in examples],
            "generate": gen,
            "system_prompt": recipe.data.system_prompt,
            "teacher": teacher_ident,
            "seed": recipe.seed,
        },
        sort_keys=True,
    )
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(recipe.data.generate.store) / f"{split}-{fingerprint}.jsonl"


def stored_train_answers(recipe: Recipe) -> Path | None:
    """The stored teacher answers to the recipe's training prompts, if a run has made them (benchmarks)."""
    if recipe.data.generate is None or recipe.teacher is None or recipe.data.train is None:
        return None
    prompts = read_examples(recipe.data.train.path, recipe.data.train.limit)
    path = generated_path(recipe, teacher_ident(recipe.teacher), "train", prompts)
    return path if path.exists() else None


def generated_data(
    recipe: Recipe, teacher: TeacherHandle, split: str, examples: list[Example], progress: Progress
) -> list[Example]:
    """Teacher answers for `examples`, stored under data.generate.store keyed by a fingerprint of what
    made them, so every run (and `distill cache`) with the same prompts, teacher and settings shares them."""
    path = generated_path(recipe, teacher.ident, split, examples)
    if path.exists():
        progress.log(f"reusing teacher answers in {path}")
        return read_examples(str(path))
    done = teacher_answers(recipe, teacher, examples, progress)
    write_jsonl_atomic(path, (example_row(ex) for ex in done))
    return done
