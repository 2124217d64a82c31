"""The stand-alone `distill eval` and `distill generate` stages (a run does both inside itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM

from distill.data.generate import generate_completions
from distill.data.records import read_examples, write_jsonl_atomic
from distill.data.tokenize import tokenize_examples
from distill.engine.progress import Progress
from distill.errors import InputError, RecipeError
from distill.eval.metrics import evaluate
from distill.models.loading import load_model, load_tokenizer, shared_vocab_size
from distill.pipeline import example_row, generated_data, live_teacher_source, write_json_atomic
from distill.recipe import GenerateConfig, ModelSource, Recipe
from distill.teachers.live import LiveTeacher


def evaluate_saved(recipe: Recipe, student_dir: Path, output: Path | None, progress: Progress) -> tuple[dict[str, Any], Path]:
    if recipe.teacher is None:
        raise RecipeError("teacher: `distill eval` compares the student with the recipe's teacher")
    if recipe.data.eval is None:
        raise RecipeError("data.eval: `distill eval` needs held-out data")
    if not (student_dir / "config.json").is_file():
        raise InputError(f"not a saved student folder (no config.json): {student_dir}")
    teacher = load_model(live_teacher_source(recipe))
    student = AutoModelForCausalLM.from_pretrained(str(student_dir)).eval()
    tok = load_tokenizer(ModelSource(path=str(student_dir)))
    vocab = shared_vocab_size(teacher, student, tok)
    examples = read_examples(recipe.data.eval.path, recipe.data.eval.limit)
    if recipe.data.generate is not None:
        examples = generated_data(recipe, teacher, "eval", examples, recipe.run_dir(), progress)
    tokenized, _ = tokenize_examples(tok, examples, recipe.data.max_length, recipe.data.system_prompt)
    result = evaluate(
        student,
        LiveTeacher(teacher.model, vocab),
        tokenized,
        vocab_size=vocab,
        pad_id=int(tok.pad_token_id or 0),
        batch_size=recipe.eval.batch_size,
        buckets=recipe.eval.position_buckets,
        chunk_size=recipe.train.chunk_size,
        progress=progress,
    )
    path = output or student_dir.parent / "eval.standalone.json"
    write_json_atomic(path, result)
    return result, path


def generate_file(recipe: Recipe, input_path: str, output: Path, progress: Progress) -> int:
    if recipe.teacher is None:
        raise RecipeError("teacher: `distill generate` needs a teacher")
    teacher = load_model(live_teacher_source(recipe))
    examples = read_examples(input_path)
    done = generate_completions(
        teacher.model,
        teacher.tokenizer,
        examples,
        recipe.data.generate or GenerateConfig(),
        system_prompt=recipe.data.system_prompt,
        seed=recipe.seed,
        progress=progress,
    )
    write_jsonl_atomic(output, (example_row(ex) for ex in done))
    return len(done)
