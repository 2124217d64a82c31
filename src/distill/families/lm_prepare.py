"""Everything the language-model family prepares before training: the teacher opened, the student built,
the teacher's answers generated, the data tokenised (in both tokenizations when they differ)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.configs.compress import CalibrationConfig
from distill.data.answers import generated_data
from distill.data.cross_tokenizer import pair_examples
from distill.data.records import Example, read_examples
from distill.data.tokenize import TokenizedExample, tokenize_examples
from distill.errors import InputError, RecipeError
from distill.families import lm_cross
from distill.models.loading import load_tokenizer, shared_vocab
from distill.models.student import Calibration, build_student
from distill.progress import Progress
from distill.recipe import Recipe
from distill.teachers.factory import TeacherHandle, open_teacher


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
    kept_channels: list[int] | None = None  # the teacher's embedding channels a width-pruned student kept
    timing: dict[str, float] = field(default_factory=dict)
    cross: bool = False  # the student's tokenizer differs from the teacher's: examples are PairedExample
    teacher_vocab: int = 0  # the teacher's own vocabulary (== vocab unless cross)
    teacher_pad_id: int = 0
    factory: Any = None  # the reasoning data factory's output (FactoryOutput) when the recipe has one
    heldout: list[Example] = field(default_factory=list)  # the factory's held-out task prompts


def prepare(
    recipe: Recipe,
    progress: Progress,
    *,
    with_student: bool = True,
    with_eval: bool = True,
    acc: Accelerator | None = None,
) -> Prepared:
    """Open the teacher, build the student (before any long stage, so a bad prune setting fails in
    seconds), let the teacher answer the prompts (main process first), tokenise."""
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    teacher: TeacherHandle | None = None
    if recipe.teacher is not None:
        progress.log(f"opening the {recipe.teacher.kind} teacher")
        need_weights = (
            recipe.student.init == "prune"
            or (with_eval and recipe.data.eval is not None)
            or (
                (recipe.data.generate is not None or recipe.factory is not None)
                and recipe.teacher.kind != "served"
            )
        )
        teacher = open_teacher(recipe.teacher, need_weights=need_weights)
    timing["load_teacher_s"] = time.perf_counter() - t0

    student = None
    info: dict[str, Any] = {}
    prune = recipe.student.prune if recipe.student.init == "prune" else None
    calibrated = prune is not None and prune.calibrated()
    if with_student and prune is not None and prune.width is not None and teacher is not None:
        check_width(prune.width.model_dump(), teacher.model)  # before generation: a typo costs seconds
    if with_student and not calibrated:
        student, info = build_student(recipe.student, teacher.model if teacher else None, seed=recipe.seed)

    factory_out = None
    if recipe.factory is not None:  # the teacher writes, verifiers filter: the kept traces are the data
        from distill.families.lm_reason import run_recipe_factory
        from distill.reasoning.views import verified_examples

        t0 = time.perf_counter()
        factory_out = run_recipe_factory(recipe, teacher, progress)
        timing["factory_s"] = time.perf_counter() - t0
        train_examples = verified_examples(factory_out)
    else:
        assert recipe.data.train is not None
        train_examples = read_examples(recipe.data.train.path, recipe.data.train.limit)
    eval_examples: list[Example] = []
    if with_eval and recipe.data.eval is not None:
        eval_examples = read_examples(recipe.data.eval.path, recipe.data.eval.limit)
    t0 = time.perf_counter()
    if recipe.data.generate is not None:
        if teacher is None:
            raise RecipeError("data.generate: needs a teacher")
        # the main process generates and stores; the others then read what it stored
        with acc.main_process_first() if acc is not None else contextlib.nullcontext():
            train_examples = generated_data(recipe, teacher, "train", train_examples, progress)
            if eval_examples:
                eval_examples = generated_data(recipe, teacher, "eval", eval_examples, progress)
    timing["generate_s"] = time.perf_counter() - t0

    if recipe.student.init == "pretrained":
        assert recipe.student.model is not None
        tokenizer = load_tokenizer(recipe.student.model)
    elif teacher is not None:
        tokenizer = teacher.tokenizer
        if recipe.student.tokenizer is not None:
            tokenizer = lm_cross.student_tokenizer(
                recipe.student.tokenizer, teacher.tokenizer, train_examples, recipe.seed
            )
    else:
        raise RecipeError("student: without a teacher, init must be 'pretrained' (a tokenizer is needed)")
    if teacher is not None and lm_cross.differ(teacher.tokenizer, tokenizer):
        if factory_out is not None:
            raise RecipeError(
                "student.tokenizer: a factory recipe trains on the teacher's tokenizer; drop it"
            )
        built = (student, info, with_student and calibrated)
        return _prepare_cross(recipe, teacher, tokenizer, built, train_examples, eval_examples, timing)
    if teacher is not None:
        lm_cross.check_methods(recipe, tokenizers_differ=False)
        ref = student if student is not None else teacher.model
        vocab = (
            shared_vocab(teacher.tokenizer, teacher.model, ref, tokenizer)
            if ref is not None
            else len(tokenizer)
        )
    else:
        assert student is not None
        vocab = int(student.config.vocab_size)
    prompts_only = all(not getattr(m, "needs_completions", True) for m in recipe.methods())
    train_tok, dropped = tokenize_examples(
        tokenizer,
        train_examples,
        recipe.data.max_length,
        recipe.data.system_prompt,
        prompts_only=prompts_only,
    )
    if not train_tok:
        source = factory_out.folder if factory_out is not None else recipe.data.train.path  # type: ignore[union-attr]
        raise InputError(f"{source}: no usable training examples (all {dropped} dropped)")
    if with_student and calibrated:  # ranks by activations on the training text, answers included
        assert prune is not None and teacher is not None
        calibration = calibration_texts(recipe, prune.calibration, tokenizer, train_tok)
        student, info = build_student(recipe.student, teacher.model, calibration, seed=recipe.seed)
    eval_tok, _ = tokenize_examples(
        tokenizer, eval_examples, recipe.data.max_length, recipe.data.system_prompt
    )
    kept = info.pop("kept_channels", None)
    heldout: list[Example] = []
    if factory_out is not None:
        from distill.reasoning.views import heldout_examples

        heldout = heldout_examples(factory_out)
    return Prepared(
        teacher,
        tokenizer,
        vocab,
        pad_id_of(tokenizer),
        train_tok,
        dropped,
        eval_tok,
        student,
        info,
        kept,
        timing,
        teacher_vocab=vocab,
        factory=factory_out,
        heldout=heldout,
    )


def _prepare_cross(
    recipe: Recipe,
    teacher: TeacherHandle,
    tokenizer: PreTrainedTokenizerBase,
    built: tuple[PreTrainedModel | None, dict[str, Any], bool],
    train_examples: list[Example],
    eval_examples: list[Example],
    timing: dict[str, float],
) -> Prepared:
    """`prepare` when the tokenizers differ: every example in both tokenizations, aligned; the student
    (built from the teacher) given the new vocabulary."""
    lm_cross.check_methods(recipe, tokenizers_differ=True)
    d = recipe.data
    if d.packing:
        raise RecipeError(
            "data.packing: cross-tokenizer batches pair each row with the teacher's; set packing: false"
        )
    train, dropped = pair_examples(
        tokenizer, teacher.tokenizer, train_examples, d.max_length, d.system_prompt
    )
    if not train:
        raise InputError(
            f"{d.train.path if d.train else 'data'}: no usable training examples (all {dropped} dropped)"
        )
    heldout, _ = pair_examples(tokenizer, teacher.tokenizer, eval_examples, d.max_length, d.system_prompt)
    student, info, calibrate = built
    if calibrate:  # ranked pruning, calibrated on the teacher's tokens of the training text
        prune = recipe.student.prune
        assert prune is not None
        teacher_rows = [p.teacher for p in train]
        calibration = calibration_texts(recipe, prune.calibration, teacher.tokenizer, teacher_rows)
        student, info = build_student(recipe.student, teacher.model, calibration, seed=recipe.seed)
    if student is not None and recipe.student.tokenizer is not None:
        info.update(
            lm_cross.adapt_student(
                student, recipe.student.tokenizer, teacher.tokenizer, tokenizer, recipe.seed
            )
        )
    kept = info.pop("kept_channels", None)
    return Prepared(
        teacher,
        tokenizer,
        len(tokenizer),
        pad_id_of(tokenizer),
        list(train),
        dropped,
        list(heldout),
        student,
        info,
        kept,
        timing,
        cross=True,
        teacher_vocab=len(teacher.tokenizer),
        teacher_pad_id=pad_id_of(teacher.tokenizer),
    )


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def calibration_texts(
    recipe: Recipe, cfg: CalibrationConfig, tokenizer: PreTrainedTokenizerBase, train: list[TokenizedExample]
) -> Calibration:
    """(input_ids, attention_mask) batches of the first `cfg.samples` training sequences (or of
    `cfg.path`), right-padded."""
    if cfg.path is not None:
        examples = read_examples(cfg.path, cfg.samples)
        rows, _ = tokenize_examples(tokenizer, examples, recipe.data.max_length, recipe.data.system_prompt)
    else:
        rows = train[: cfg.samples]
    if not rows:
        raise InputError(f"student.prune.calibration.path: no usable examples in {cfg.path}")

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(rows), cfg.batch_size):
            chunk = [r.input_ids for r in rows[start : start + cfg.batch_size]]
            width = max(len(c) for c in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, c in enumerate(chunk):
                ids[i, : len(c)] = torch.tensor(c)
                mask[i, : len(c)] = 1
            yield ids, mask

    return batches


def check_width(width: dict[str, Any], teacher: PreTrainedModel | None) -> None:
    """A student width above the teacher's, named by its field (pruning cannot add channels)."""
    if teacher is None:
        return
    for key, value in width.items():
        have = getattr(teacher.config, key, None)
        if value is not None and isinstance(have, int) and value > have:
            raise RecipeError(f"student.prune.width.{key}: {value} is larger than the teacher's {have}")
