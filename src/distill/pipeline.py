"""A whole run, from recipe to report: load, generate, train every method with the same data and steps,
evaluate before and after on held-out data, write the report.

Run folder layout:
  recipe.yaml            the resolved recipe
  methods/<name>/        metrics.jsonl, checkpoints/, student/, eval.json
  eval.json              before/after numbers of every method, timings
  report.md, report.html, *.png
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.data.batching import BatchStream
from distill.data.generate import generate_completions
from distill.data.records import Example, read_examples
from distill.io import write_json_atomic, write_jsonl_atomic, write_text_atomic
from distill.data.tokenize import TokenizedExample, prompt_ids, tokenize_examples
from distill.progress import NullProgress, Progress
from distill.engine.seeding import seed_everything
from distill.engine.trainer import train
from distill.errors import InputError, RecipeError
from distill.eval.metrics import evaluate
from distill.eval.report import write_report
from distill.methods import METHODS
from distill.models.loading import load_tokenizer, save_student, shared_vocab
from distill.models.student import build_student
from distill.recipe import GenerateConfig, Recipe, dump_recipe, preflight
from distill.teachers.factory import TeacherHandle, open_teacher, teacher_ident
from distill.teachers.served import ServedTeacherSource


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
    if isinstance(teacher.remote, ServedTeacherSource):
        prompts = [prompt_ids(teacher.tokenizer, ex.prompt, system) for ex in examples]
        progress.start("teacher generating (server)", None)
        outs = teacher.remote.generate(
            prompts, gen.max_new_tokens, gen.temperature if gen.do_sample else 0.0, gen.top_p, recipe.seed
        )
        progress.finish()
        return [replace(ex, completion=o.text.strip(), finished=o.finished) for ex, o in zip(examples, outs, strict=True)]
    if teacher.model is None:
        raise RecipeError("data.generate: generation needs the teacher's weights (a live teacher or a local copy)")
    return generate_completions(
        teacher.model, teacher.tokenizer, examples, gen, system_prompt=system, seed=recipe.seed, progress=progress
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
    if recipe.data.generate is None or recipe.teacher is None:
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


def _check_resume(recipe: Recipe, run_dir: Path, resume: bool) -> None:
    saved = run_dir / "recipe.yaml"
    if resume and saved.exists() and saved.read_text(encoding="utf-8") != dump_recipe(recipe):
        raise RecipeError(f"--resume: the recipe differs from {saved}; resume with the same recipe")


@dataclass
class Prepared:
    """What every stage needs before training: teacher, tokenizer, vocabulary, tokenised data, student init."""

    teacher: TeacherHandle | None
    tokenizer: PreTrainedTokenizerBase
    vocab: int
    pad_id: int
    train: list[TokenizedExample]
    dropped: int
    eval: list[TokenizedExample]
    student: PreTrainedModel | None
    student_info: dict[str, Any]
    timing: dict[str, float]


def prepare(recipe: Recipe, progress: Progress, *, with_student: bool = True, with_eval: bool = True) -> Prepared:
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    teacher: TeacherHandle | None = None
    if recipe.teacher is not None:
        progress.log(f"opening the {recipe.teacher.kind} teacher")
        need_weights = (
            recipe.student.init == "prune"
            or (with_eval and recipe.data.eval is not None)
            or (recipe.data.generate is not None and recipe.teacher.kind != "served")
        )
        teacher = open_teacher(recipe.teacher, need_weights=need_weights)
    timing["load_teacher_s"] = time.perf_counter() - t0

    train_examples = read_examples(recipe.data.train.path, recipe.data.train.limit)
    eval_examples: list[Example] = []
    if with_eval and recipe.data.eval is not None:
        eval_examples = read_examples(recipe.data.eval.path, recipe.data.eval.limit)
    t0 = time.perf_counter()
    if recipe.data.generate is not None:
        if teacher is None:
            raise RecipeError("data.generate: needs a teacher")
        train_examples = generated_data(recipe, teacher, "train", train_examples, progress)
        if eval_examples:
            eval_examples = generated_data(recipe, teacher, "eval", eval_examples, progress)
    timing["generate_s"] = time.perf_counter() - t0

    student = None
    info: dict[str, Any] = {}
    if with_student:
        student, info = build_student(recipe.student, teacher.model if teacher else None)
    if recipe.student.init == "pretrained":
        assert recipe.student.model is not None
        tokenizer = load_tokenizer(recipe.student.model)
    elif teacher is not None:
        tokenizer = teacher.tokenizer
    else:
        raise RecipeError("student: without a teacher, init must be 'pretrained' (a tokenizer is needed)")
    if teacher is not None:
        ref = student if student is not None else teacher.model
        vocab = shared_vocab(teacher.tokenizer, teacher.model, ref, tokenizer) if ref is not None else len(tokenizer)
    else:
        assert student is not None
        vocab = int(student.config.vocab_size)
    train_tok, dropped = tokenize_examples(tokenizer, train_examples, recipe.data.max_length, recipe.data.system_prompt)
    if not train_tok:
        raise InputError(f"{recipe.data.train.path}: no usable training examples (all {dropped} dropped)")
    eval_tok, _ = tokenize_examples(tokenizer, eval_examples, recipe.data.max_length, recipe.data.system_prompt)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    return Prepared(teacher, tokenizer, vocab, pad_id, train_tok, dropped, eval_tok, student, info, timing)


def run_recipe(recipe: Recipe, *, resume: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Run every method of the recipe; return the summary written to eval.json."""
    progress = progress or NullProgress()
    t_start = time.perf_counter()
    preflight(recipe)
    run_dir = recipe.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_resume(recipe, run_dir, resume)
    write_text_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    seed_everything(recipe.seed, recipe.train.deterministic)

    prep = prepare(recipe, progress)
    timing = prep.timing
    base_student = prep.student
    assert base_student is not None
    vocab, eval_tok, train_tok = prep.vocab, prep.eval, prep.train
    exact = prep.teacher.exact(vocab) if prep.teacher else None
    source = prep.teacher.source(vocab) if prep.teacher else None

    def run_eval(model: torch.nn.Module) -> dict[str, Any] | None:
        if not eval_tok:
            return None
        return evaluate(
            model,  # type: ignore[arg-type]
            exact,
            eval_tok,
            vocab_size=vocab,
            pad_id=prep.pad_id,
            batch_size=recipe.eval.batch_size,
            buckets=recipe.eval.position_buckets,
            chunk_size=recipe.train.chunk_size,
            progress=progress,
        )

    summary_path = run_dir / "eval.json"
    previous = json.loads(summary_path.read_text()) if resume and summary_path.exists() else {}
    t0 = time.perf_counter()
    before = previous.get("before") if previous.get("before") else (run_eval(base_student) if recipe.eval.before else None)
    timing["eval_before_s"] = time.perf_counter() - t0

    results: dict[str, Any] = {}
    for cfg in [recipe.method, *recipe.baselines]:
        method_dir = run_dir / "methods" / cfg.name
        done_file = method_dir / "eval.json"
        if resume and done_file.exists() and (method_dir / "student").exists():
            results[cfg.name] = json.loads(done_file.read_text())
            progress.log(f"{cfg.name}: already finished, skipped")
            continue
        method = METHODS.get(cfg.name)(cfg)  # type: ignore[call-arg]
        student = copy.deepcopy(base_student)
        stream = _stream(recipe, train_tok, prep.pad_id)
        result = train(
            student=student,
            method=method,
            stream=stream,
            teacher=source if method.needs_teacher else None,
            cfg=recipe.train,
            out_dir=method_dir,
            vocab_size=vocab,
            seed=recipe.seed,
            resume=resume,
            progress=progress,
        )
        t0 = time.perf_counter()
        after = run_eval(student)
        eval_s = time.perf_counter() - t0
        save_student(student, prep.tokenizer, method_dir / "student")
        hist = result.history
        entry = {
            "method": cfg.model_dump(mode="json"),
            "after": after,
            "steps": result.steps,
            "train_seconds": result.seconds,
            "eval_seconds": eval_s,
            "resumed_from": result.resumed_from,
            "final_loss": hist[-1]["loss"] if hist else None,
            "step_seconds_median": sorted(h["step_seconds"] for h in hist)[len(hist) // 2] if hist else None,
            "real_tokens_per_s": (
                sum(h["real_tokens"] for h in hist) / sum(h["step_seconds"] for h in hist) if hist else None
            ),
            "padding_fraction": (
                1 - sum(h["real_tokens"] for h in hist) / max(1, sum(h["padded_slots"] for h in hist)) if hist else None
            ),
        }
        write_json_atomic(done_file, entry)
        results[cfg.name] = entry
        del student
    if prep.teacher is not None:
        prep.teacher.close()

    timing["total_s"] = time.perf_counter() - t_start
    summary = {
        "name": recipe.name,
        "primary": recipe.method.name,
        "teacher": f"{prep.teacher.kind}: {prep.teacher.ident}" if prep.teacher else None,
        "student": prep.student_info,
        "data": {
            "train_examples": len(train_tok),
            "train_dropped": prep.dropped,
            "eval_examples": len(eval_tok),
            "train_answer_tokens": sum(t.num_loss_tokens for t in train_tok),
            "eval_answer_tokens": sum(t.num_loss_tokens for t in eval_tok),
        },
        "before": before,
        "methods": results,
        "timing": timing,
        "selection": "final step of each method; held-out data is never used for selection",
    }
    write_json_atomic(summary_path, summary)
    write_report(run_dir, summary, dump_recipe(recipe))
    return summary


def _stream(recipe: Recipe, examples: list[TokenizedExample], pad_id: int) -> BatchStream:
    return BatchStream(
        examples,
        recipe.data.batch_size,
        pad_id,
        seed=recipe.seed,
        group_by_length=recipe.data.group_by_length,
        packing=recipe.data.packing,
        max_length=recipe.data.max_length,
    )
