"""The language-model family: chat/prompt data tokenised with the teacher's (or student's) tokenizer, a
live / cached / served teacher, a student pruned from the teacher or built from a config, held-out KL
against the teacher's exact distribution (bits per byte when the tokenizers differ)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from accelerate import Accelerator

from distill.configs.base import MethodConfigBase
from distill.data.batching import BatchStream
from distill.data.cross_tokenizer import CrossBatchStream, PairedExample
from distill.eval.bits_per_byte import evaluate_bits_per_byte
from distill.eval.metrics import evaluate
from distill.eval.own_samples import own_sample_columns, own_sample_metrics
from distill.families import lm_cross, lm_reason
from distill.families.base import FAMILIES, Family
from distill.families.lm_prepare import Prepared, prepare
from distill.methods.base import METHODS, Method, Stream
from distill.methods.lm import (  # noqa: F401 - registers the LM methods
    cross_entropy,
    cross_tokenizer_kd,
    feature_drafter,
    logit_kd,
    minillm,
    on_policy,
    pairwise,
    representation_kd,
    step_by_step,
    trace_sft,
)
from distill.methods.lm.base import LMContext, LMMethod
from distill.progress import Progress
from distill.recipe import Recipe
from distill.recipe_base import RecipeBase
from distill.teachers.live import LiveTeacherSource

__all__ = ["LMFamily", "Prepared", "prepare"]


@FAMILIES.register("lm")
class LMFamily(Family):
    name = "lm"

    def prepare(self, recipe: RecipeBase, acc: Accelerator, progress: Progress) -> None:
        assert isinstance(recipe, Recipe)
        self.recipe = recipe
        self.device = acc.device
        self.prep = prepare(recipe, progress, acc=acc)
        teacher, vocab = self.prep.teacher, self.prep.teacher_vocab
        self.source = teacher.source(vocab) if teacher else None
        self.exact: LiveTeacherSource | None = teacher.exact(vocab) if teacher else None
        self.teacher_memo: dict[tuple[int, ...], torch.Tensor] = {}  # held-out teacher log-probs, scored once

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
            seed=seed,
            train=self.prep.train,
        )
        method: Method = METHODS.get(cfg.name)(cfg, ctx)  # type: ignore[call-arg]
        if hasattr(method, "set_total_steps"):  # schedules over the run (DistiLLM's replay)
            method.set_total_steps(self.recipe.train.steps)
        return method

    def make_stream(self, method: Method, seed: int) -> Stream:
        data = self.recipe.data
        if self.prep.factory is not None:
            assert isinstance(method, LMMethod)
            return lm_reason.view_stream(
                self.recipe,
                self.prep.factory,
                method.cfg,
                self.prep.tokenizer,
                self.prep.train,
                self.prep.pad_id,
                seed,
            )
        if self.prep.cross:
            pairs = [p for p in self.prep.train if isinstance(p, PairedExample)]
            return CrossBatchStream(
                pairs,
                data.batch_size,
                self.prep.pad_id,
                self.prep.teacher_pad_id,
                seed=seed,
                group_by_length=data.group_by_length,
                max_length=data.max_length,
            )
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
        if not self.prep.eval and not self.prep.heldout:
            return None
        if method is None:
            model = self.prep.student
        else:
            assert isinstance(method, LMMethod)
            model = method.eval_model()
        assert model is not None
        model.to(self.device)
        if self.prep.heldout:
            cfg = method.cfg if isinstance(method, LMMethod) else None
            return lm_reason.evaluate_accuracy(
                self.recipe, model, self.prep.tokenizer, self.prep.heldout, cfg, progress
            )
        if self.exact is not None:
            self.exact.model.to(self.device)
        if self.prep.cross:
            return evaluate_bits_per_byte(
                model,
                self.exact.model if self.exact is not None else None,
                [p for p in self.prep.eval if isinstance(p, PairedExample)],
                pad_id=self.prep.pad_id,
                teacher_pad_id=self.prep.teacher_pad_id,
                batch_size=self.recipe.eval.batch_size,
                chunk_size=self.recipe.train.chunk_size,
                progress=progress,
                teacher_memo=self.teacher_memo,
            )
        scores = evaluate(
            model,
            self.exact,
            self.prep.eval,
            vocab_size=self.prep.vocab,
            pad_id=self.prep.pad_id,
            batch_size=self.recipe.eval.batch_size,
            buckets=self.recipe.eval.position_buckets,
            chunk_size=self.recipe.train.chunk_size,
            progress=progress,
            teacher_memo=self.teacher_memo,
        )
        own = self.recipe.eval.own_samples
        if own is not None and self.exact is not None:
            eos = self.prep.tokenizer.eos_token_id
            scores |= own_sample_metrics(
                model,
                self.exact,
                self.prep.eval,
                own,
                eos_ids=[eos] if eos is not None else [],
                vocab_size=self.prep.vocab,
                pad_id=self.prep.pad_id,
                batch_size=self.recipe.eval.batch_size,
                chunk_size=self.recipe.train.chunk_size,
            )
        return scores

    def timings(self) -> dict[str, float]:
        return dict(self.prep.timing)

    def result_columns(self) -> list[dict[str, str]]:
        if self.prep.heldout:
            return lm_reason.result_columns(self.prep.heldout)
        if self.prep.cross:
            return lm_cross.result_columns(self.exact is not None)
        if self.recipe.eval.own_samples is not None and self.exact is not None:
            return own_sample_columns()
        return []

    def results_note(self) -> str:
        if self.prep.heldout:
            return lm_reason.results_note(self.recipe, self.prep.heldout)
        if self.prep.cross:
            return lm_cross.results_note(len(self.prep.eval), self.exact is not None)
        own = self.recipe.eval.own_samples
        if own is not None and self.exact is not None:
            return (
                f"KL and top-1 on {len(self.prep.eval)} held-out answers; 'on own samples': on the answers each "
                f"model writes itself to the same prompts (up to {own.max_new_tokens} tokens, temperature "
                f"{own.temperature}, seed {own.seed}), scored by the teacher"
            )
        return ""

    def describe(self) -> dict[str, Any]:
        prep = self.prep
        extra: dict[str, Any] = {}
        if prep.factory is not None:
            extra["sections"] = lm_reason.factory_sections(prep.factory)
            extra["factory"] = {k: prep.factory.manifest.get(k) for k in ("funnel", "drops", "contamination")}
        return {
            **extra,
            "teacher": f"{prep.teacher.kind}: {prep.teacher.ident}" if prep.teacher else None,
            "student": prep.student_info,
            "data": {
                "train_examples": len(prep.train),
                "train_dropped": prep.dropped,
                "eval_examples": len(prep.eval) or len(prep.heldout),
                "train_answer_tokens": sum(t.num_loss_tokens for t in prep.train),
                "eval_answer_tokens": sum(t.num_loss_tokens for t in prep.eval),
            },
        }

    def close(self) -> None:
        if self.prep.teacher is not None:
            self.prep.teacher.close()
