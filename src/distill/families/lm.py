"""The language-model family: chat/prompt data tokenised with the teacher's (or student's) tokenizer, a
live / cached / served teacher, a student pruned from the teacher or built from a config, held-out KL
against the teacher's exact distribution."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.configs.base import MethodConfigBase
from distill.configs.compress import CalibrationConfig
from distill.data.answers import generated_data
from distill.data.batching import BatchStream
from distill.data.records import Example, read_examples
from distill.data.tokenize import TokenizedExample, tokenize_examples
from distill.errors import InputError, RecipeError
from distill.eval.metrics import evaluate
from distill.families.base import FAMILIES, Family
from distill.methods.base import METHODS, Method
from distill.methods.lm import (  # noqa: F401 - registers the LM methods
    cross_entropy,
    logit_kd,
    representation_kd,
)
from distill.methods.lm.base import LMContext, LMMethod
from distill.models.loading import load_tokenizer, shared_vocab
from distill.models.student import Calibration, build_student
from distill.progress import Progress
from distill.recipe import Recipe
from distill.recipe_base import RecipeBase
from distill.teachers.factory import TeacherHandle, open_teacher
from distill.teachers.live import LiveTeacherSource


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
            or (recipe.data.generate is not None and recipe.teacher.kind != "served")
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
    else:
        raise RecipeError("student: without a teacher, init must be 'pretrained' (a tokenizer is needed)")
    if teacher is not None:
        ref = student if student is not None else teacher.model
        vocab = (
            shared_vocab(teacher.tokenizer, teacher.model, ref, tokenizer)
            if ref is not None
            else len(tokenizer)
        )
    else:
        assert student is not None
        vocab = int(student.config.vocab_size)
    train_tok, dropped = tokenize_examples(
        tokenizer, train_examples, recipe.data.max_length, recipe.data.system_prompt
    )
    if not train_tok:
        raise InputError(f"{recipe.data.train.path}: no usable training examples (all {dropped} dropped)")
    if with_student and calibrated:  # ranks by activations on the training text, answers included
        assert prune is not None and teacher is not None
        calibration = calibration_texts(recipe, prune.calibration, tokenizer, train_tok)
        student, info = build_student(recipe.student, teacher.model, calibration, seed=recipe.seed)
    eval_tok, _ = tokenize_examples(
        tokenizer, eval_examples, recipe.data.max_length, recipe.data.system_prompt
    )
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    kept = info.pop("kept_channels", None)
    return Prepared(teacher, tokenizer, vocab, pad_id, train_tok, dropped, eval_tok, student, info, kept, timing)


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


@FAMILIES.register("lm")
class LMFamily(Family):
    name = "lm"

    def prepare(self, recipe: RecipeBase, acc: Accelerator, progress: Progress) -> None:
        assert isinstance(recipe, Recipe)
        self.recipe = recipe
        self.device = acc.device
        self.prep = prepare(recipe, progress, acc=acc)
        teacher, vocab = self.prep.teacher, self.prep.vocab
        self.source = teacher.source(vocab) if teacher else None
        self.exact: LiveTeacherSource | None = teacher.exact(vocab) if teacher else None

    def make_method(self, cfg: MethodConfigBase, seed: int) -> Method:
        assert self.prep.student is not None
        ctx = LMContext(
            student=copy.deepcopy(self.prep.student),
            teacher=self.source,
            vocab_size=self.prep.vocab,
            chunk_size=self.recipe.train.chunk_size,
            tokenizer=self.prep.tokenizer,
            lora=self.recipe.student.lora,
            layer_origin=self.prep.student_info.get("kept_layers"),
            kept_channels=self.prep.kept_channels,
        )
        method: Method = METHODS.get(cfg.name)(cfg, ctx)  # type: ignore[call-arg]
        return method

    def make_stream(self, method: Method, seed: int) -> BatchStream:
        data = self.recipe.data
        return BatchStream(
            self.prep.train,
            data.batch_size,
            self.prep.pad_id,
            seed=seed,
            group_by_length=data.group_by_length,
            packing=data.packing,
            max_length=data.max_length,
        )

    def evaluate(self, method: Method | None, progress: Progress) -> dict[str, Any] | None:
        if not self.prep.eval:
            return None
        if method is None:
            model = self.prep.student
        else:
            assert isinstance(method, LMMethod)
            model = method.eval_model()
        assert model is not None
        model.to(self.device)
        if self.exact is not None:
            self.exact.model.to(self.device)
        return evaluate(
            model,
            self.exact,
            self.prep.eval,
            vocab_size=self.prep.vocab,
            pad_id=self.prep.pad_id,
            batch_size=self.recipe.eval.batch_size,
            buckets=self.recipe.eval.position_buckets,
            chunk_size=self.recipe.train.chunk_size,
            progress=progress,
        )

    def timings(self) -> dict[str, float]:
        return dict(self.prep.timing)

    def describe(self) -> dict[str, Any]:
        prep = self.prep
        return {
            "teacher": f"{prep.teacher.kind}: {prep.teacher.ident}" if prep.teacher else None,
            "student": prep.student_info,
            "data": {
                "train_examples": len(prep.train),
                "train_dropped": prep.dropped,
                "eval_examples": len(prep.eval),
                "train_answer_tokens": sum(t.num_loss_tokens for t in prep.train),
                "eval_answer_tokens": sum(t.num_loss_tokens for t in prep.eval),
            },
        }

    def close(self) -> None:
        if self.prep.teacher is not None:
            self.prep.teacher.close()
