"""A whole run, from recipe to report: load, generate, train every method with the same data and steps,
evaluate before and after on held-out data, write the report.

Run folder layout:
  recipe.yaml            the resolved recipe
  data/                  teacher-generated train/eval answers (+ manifest with a fingerprint)
  methods/<name>/        metrics.jsonl, checkpoints/, student/, eval.json
  eval.json              before/after numbers of every method, timings
  report.md, report.html, *.png
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from distill.data.batching import BatchStream
from distill.data.generate import generate_completions
from distill.data.records import Example, read_examples, write_jsonl_atomic
from distill.data.tokenize import TokenizedExample, tokenize_examples
from distill.engine.progress import NullProgress, Progress
from distill.engine.seeding import seed_everything
from distill.engine.trainer import train
from distill.errors import InputError, RecipeError
from distill.eval.metrics import evaluate
from distill.eval.report import write_report
from distill.methods import METHODS
from distill.models.loading import (
    LoadedModel,
    load_model,
    load_tokenizer,
    save_student,
    shared_vocab_size,
)
from distill.models.student import build_student
from distill.recipe import LiveTeacher as LiveTeacherConfig
from distill.recipe import ModelSource, Recipe, dump_recipe, preflight
from distill.teachers.live import LiveTeacher


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def example_row(ex: Example) -> dict[str, Any]:
    row: dict[str, Any] = {"messages": [*ex.prompt, {"role": "assistant", "content": ex.completion or ""}]}
    row["finished"] = ex.finished
    return row


def _read_generated(path: Path) -> list[Example]:
    out = read_examples(str(path))
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for ex, row in zip(out, rows, strict=True):
        ex.finished = bool(row.get("finished", True))
    return out


def generated_data(
    recipe: Recipe, teacher: LoadedModel, split: str, examples: list[Example], run_dir: Path, progress: Progress
) -> list[Example]:
    """Teacher answers for `examples`, cached under run_dir/data keyed by a fingerprint of what made them."""
    assert recipe.data.generate is not None
    key = json.dumps(
        {
            "prompts": [ex.prompt for ex in examples],
            "generate": recipe.data.generate.model_dump(),
            "system_prompt": recipe.data.system_prompt,
            "teacher": teacher.source,
            "seed": recipe.seed,
        },
        sort_keys=True,
    )
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = run_dir / "data"
    path = folder / f"{split}.jsonl"
    manifest = folder / f"{split}.manifest.json"
    if path.exists() and manifest.exists() and json.loads(manifest.read_text())["fingerprint"] == fingerprint:
        progress.log(f"reusing teacher answers in {path}")
        return _read_generated(path)
    done = generate_completions(
        teacher.model,
        teacher.tokenizer,
        examples,
        recipe.data.generate,
        system_prompt=recipe.data.system_prompt,
        seed=recipe.seed,
        progress=progress,
    )
    write_jsonl_atomic(path, (example_row(ex) for ex in done))
    write_json_atomic(manifest, {"fingerprint": fingerprint, "count": len(done)})
    return done


def _check_resume(recipe: Recipe, run_dir: Path, resume: bool) -> None:
    saved = run_dir / "recipe.yaml"
    if resume and saved.exists() and saved.read_text(encoding="utf-8") != dump_recipe(recipe):
        raise RecipeError(f"--resume: the recipe differs from {saved}; resume with the same recipe")


def live_teacher_source(recipe: Recipe) -> ModelSource:
    if not isinstance(recipe.teacher, LiveTeacherConfig):
        kind = recipe.teacher.kind if recipe.teacher else "none"
        raise RecipeError(f"teacher.kind: {kind!r} is not supported by this command yet (use 'live')")
    return recipe.teacher.model


def run_recipe(recipe: Recipe, *, resume: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Run every method of the recipe; return the summary written to eval.json."""
    progress = progress or NullProgress()
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    preflight(recipe)
    run_dir = recipe.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_resume(recipe, run_dir, resume)
    write_text_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    seed_everything(recipe.seed, recipe.train.deterministic)

    t0 = time.perf_counter()
    teacher: LoadedModel | None = None
    if recipe.teacher is not None:
        source = live_teacher_source(recipe)
        progress.log(f"loading teacher {source.path}")
        teacher = load_model(source)
    timing["load_teacher_s"] = time.perf_counter() - t0

    train_examples = read_examples(recipe.data.train.path, recipe.data.train.limit)
    eval_examples = read_examples(recipe.data.eval.path, recipe.data.eval.limit) if recipe.data.eval else []
    t0 = time.perf_counter()
    if recipe.data.generate is not None:
        assert teacher is not None
        train_examples = generated_data(recipe, teacher, "train", train_examples, run_dir, progress)
        if eval_examples:
            eval_examples = generated_data(recipe, teacher, "eval", eval_examples, run_dir, progress)
    timing["generate_s"] = time.perf_counter() - t0

    base_student, student_info = build_student(recipe.student, teacher.model if teacher else None)
    if recipe.student.init == "pretrained":
        assert recipe.student.model is not None
        tokenizer = load_tokenizer(recipe.student.model)
    elif teacher is not None:
        tokenizer = teacher.tokenizer
    else:
        raise RecipeError("student: without a teacher, init must be 'pretrained' (a tokenizer is needed)")
    vocab = shared_vocab_size(teacher, base_student, tokenizer) if teacher else base_student.config.vocab_size
    live = LiveTeacher(teacher.model, vocab) if teacher else None

    train_tok, dropped = tokenize_examples(tokenizer, train_examples, recipe.data.max_length, recipe.data.system_prompt)
    if not train_tok:
        raise InputError(f"{recipe.data.train.path}: no usable training examples (all {dropped} dropped)")
    eval_tok, _ = tokenize_examples(tokenizer, eval_examples, recipe.data.max_length, recipe.data.system_prompt)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)

    def run_eval(model: torch.nn.Module) -> dict[str, Any] | None:
        if not eval_tok:
            return None
        return evaluate(
            model,  # type: ignore[arg-type]
            live,
            eval_tok,
            vocab_size=vocab,
            pad_id=pad_id,
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
        stream = _stream(recipe, train_tok, pad_id)
        result = train(
            student=student,
            method=method,
            stream=stream,
            teacher=live if method.needs_teacher else None,
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
        save_student(student, tokenizer, method_dir / "student")
        hist = result.history
        entry = {
            "method": cfg.model_dump(mode="json"),
            "after": after,
            "steps": result.steps,
            "train_seconds": result.seconds,
            "eval_seconds": eval_s,
            "resumed_from": result.resumed_from,
            "final_loss": hist[-1]["loss"] if hist else None,
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

    timing["total_s"] = time.perf_counter() - t_start
    summary = {
        "name": recipe.name,
        "primary": recipe.method.name,
        "teacher": teacher.source if teacher else None,
        "student": student_info,
        "data": {
            "train_examples": len(train_tok),
            "train_dropped": dropped,
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
