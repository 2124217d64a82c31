"""The stages a user can run on their own, outside `distill run`: `distill eval` (a saved student against
the teacher), `distill generate` (teacher answers to a prompt file) and `distill cache` (the teacher's
top-k stored once, then read by runs with `teacher.kind: cache`) and `distill prune` (a pruned
student saved as a folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM

from distill.data.answers import example_row, generated_data, teacher_answers
from distill.data.cross_tokenizer import PairedExample, pair_examples
from distill.data.records import read_examples
from distill.data.tokenize import tokenize_examples
from distill.errors import InputError, RecipeError
from distill.eval.bits_per_byte import evaluate_bits_per_byte
from distill.eval.metrics import evaluate
from distill.families.lm import prepare
from distill.families.lm_cross import differ
from distill.families.lm_prepare import pad_id_of
from distill.io import write_json_atomic, write_jsonl_atomic
from distill.models.loading import load_tokenizer, shared_vocab, tokenizer_fingerprint
from distill.progress import Progress
from distill.recipe import ModelConfig, Recipe, preflight, probe_path
from distill.teachers.factory import TeacherHandle, open_teacher


def evaluate_saved(
    recipe: Recipe, student_dir: Path, output: Path | None, progress: Progress
) -> tuple[dict[str, Any], Path]:
    if recipe.teacher is None:
        raise RecipeError("teacher: `distill eval` compares the student with the recipe's teacher")
    if recipe.data.eval is None:
        raise RecipeError("data.eval: `distill eval` needs held-out data")
    if not probe_path("--student", student_dir / "config.json", Path.is_file):
        raise InputError(f"not a saved student folder (no config.json): {student_dir}")
    preflight(recipe)
    teacher = open_teacher(recipe.teacher, need_weights=True)
    student = AutoModelForCausalLM.from_pretrained(str(student_dir), local_files_only=True).eval()
    tok = load_tokenizer(ModelConfig(path=str(student_dir)))
    if teacher.model is None:
        raise RecipeError("teacher: evaluation needs the teacher's weights on this machine")
    examples = read_examples(recipe.data.eval.path, recipe.data.eval.limit)
    if recipe.data.generate is not None:
        examples = generated_data(recipe, teacher, "eval", examples, progress)
    if differ(teacher.tokenizer, tok):  # another tokenizer: bits per byte and chunk KL
        d = recipe.data
        pairs, _ = pair_examples(tok, teacher.tokenizer, examples, d.max_length, d.system_prompt)
        result = evaluate_bits_per_byte(
            student,
            teacher.model,
            pairs,
            pad_id=pad_id_of(tok),
            teacher_pad_id=pad_id_of(teacher.tokenizer),
            batch_size=recipe.eval.batch_size,
            chunk_size=recipe.train.chunk_size,
            progress=progress,
        )
        return _saved_eval(result, student_dir, output, teacher)
    vocab = shared_vocab(teacher.tokenizer, teacher.model, student, tok)
    exact = teacher.exact(vocab)
    assert exact is not None
    tokenized, _ = tokenize_examples(tok, examples, recipe.data.max_length, recipe.data.system_prompt)
    result = evaluate(
        student,
        exact,
        tokenized,
        vocab_size=vocab,
        pad_id=int(tok.pad_token_id or 0),
        batch_size=recipe.eval.batch_size,
        buckets=recipe.eval.position_buckets,
        chunk_size=recipe.train.chunk_size,
        progress=progress,
    )
    return _saved_eval(result, student_dir, output, teacher)


def _saved_eval(
    result: dict[str, Any], student_dir: Path, output: Path | None, teacher: TeacherHandle
) -> tuple[dict[str, Any], Path]:
    path = output or student_dir.parent / "eval.standalone.json"
    write_json_atomic(path, result)
    teacher.close()
    return result, path


def generate_file(recipe: Recipe, input_path: str, output: Path, progress: Progress) -> int:
    if recipe.teacher is None:
        raise RecipeError("teacher: `distill generate` needs a teacher")
    if not probe_path("--input", Path(input_path), Path.exists):
        raise InputError(f"--input: file not found: {input_path}")
    examples = read_examples(input_path)  # before the teacher loads: a bad file fails in seconds
    teacher = open_teacher(recipe.teacher, need_weights=recipe.teacher.kind != "served")
    done = teacher_answers(recipe, teacher, examples, progress)
    write_jsonl_atomic(output, (example_row(ex) for ex in done))
    teacher.close()
    return len(done)


def cache_teacher(recipe: Recipe, progress: Progress) -> dict[str, Any]:
    """Run the recipe's (live or served) teacher once over the training data and store its top-k."""
    from distill.teachers.cache_writer import write_cache

    if recipe.teacher is None or recipe.teacher.kind == "cache":
        raise RecipeError("teacher.kind: `distill cache` runs a live or served teacher")
    preflight(recipe)
    prep = prepare(recipe, progress, with_student=False, with_eval=False)
    assert prep.teacher is not None
    cfg = recipe.cache
    # across tokenizers the cache holds the teacher's view: its tokens of the same texts
    rows = [p.teacher for p in prep.train if isinstance(p, PairedExample)] if prep.cross else prep.train
    teacher_tok = prep.teacher.tokenizer if prep.cross else prep.tokenizer
    manifest = write_cache(
        prep.teacher.source(prep.teacher_vocab),
        rows,
        recipe.cache_dir(),
        k=cfg.k,
        temperature=cfg.temperature,
        teacher_id=prep.teacher.ident,
        tokenizer_hash=tokenizer_fingerprint(teacher_tok),
        vocab_size=prep.teacher_vocab,
        shard_size=cfg.shard_size,
        batch_size=cfg.batch_size,
        value_step=cfg.value_step,
        zstd_level=cfg.zstd_level,
        pad_id=prep.teacher_pad_id if prep.cross else prep.pad_id,
        progress=progress,
    )
    prep.teacher.close()
    return {
        "path": str(recipe.cache_dir()),
        "tokens": manifest.total_tokens,
        "bytes_per_token": manifest.bytes_per_token,
    }


def prune_to_folder(recipe: Recipe, folder: Path, progress: Progress) -> dict[str, Any]:
    """Build the recipe's student (depth / width pruning, calibrated on its training text) and save it as
    a plain `from_pretrained` folder, for recovery with any method or tool."""
    from distill.models.loading import save_student

    if recipe.student.init != "prune":
        raise RecipeError("student.init: `distill prune` builds a pruned student; set student.init: prune")
    preflight(recipe)
    prep = prepare(recipe, progress, with_eval=False)
    assert prep.student is not None
    student: Any = prep.student
    if recipe.student.lora is not None:  # the pruned weights, not the (untrained) adapters
        from distill.models.lora import base_copy

        student = base_copy(student)
    save_student(student, prep.tokenizer, folder)
    if prep.teacher is not None:
        prep.teacher.close()
    return prep.student_info


def run_factory_stage(recipe: Recipe, progress: Progress) -> tuple[Path, list[dict[str, Any]]]:
    """`distill factory`: the data factory alone (resumable), without training; its folder and funnel."""
    from distill.families.lm_reason import run_recipe_factory
    from distill.reasoning.views import funnel_rows

    if recipe.factory is None:
        raise RecipeError("factory: this recipe has no factory section")
    preflight(recipe)
    assert recipe.teacher is not None
    teacher = open_teacher(recipe.teacher, need_weights=recipe.teacher.kind != "served")
    try:
        out = run_recipe_factory(recipe, teacher, progress)
    finally:
        teacher.close()
    return out.folder, funnel_rows(out.manifest)
