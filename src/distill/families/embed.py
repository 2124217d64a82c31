"""The embedding family: a sentence-encoder teacher, a student cut from it (kept blocks) or built fresh
in its architecture, sentences to distil on, and held-out numbers that compare the two encoders on one
scale whatever the student's width: similarity Spearman, neighbour recall@k and encode throughput.
Reranking recipes (`rerank_kd`: (query, passage) pairs, scorers) hand their data and evaluation to
`embed.rerank_task.RerankTask`; teacher and student init are shared."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from accelerate import Accelerator

from distill.configs.base import MethodConfigBase
from distill.configs.embed import EmbedKDConfig
from distill.embed.encoders import (
    SentenceEncoder,
    evenly_spaced,
    fresh_encoder,
    load_encoder,
    prune_depth,
    set_dropout,
)
from distill.embed.evaluate import encode, neighbour_recall, pair_spearman, throughput
from distill.embed.rerank_task import RerankTask, is_rerank
from distill.embed.text import TextStream, read_sentences, tokenise
from distill.errors import RecipeError
from distill.families.base import FAMILIES, Family
from distill.methods.base import Method, Stream
from distill.methods.embed.kd import EmbedContext, EmbedKD
from distill.paths import resolve_path
from distill.progress import Progress
from distill.recipe_base import RecipeBase
from distill.recipe_embed import EmbedRecipe


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@FAMILIES.register("embed")
class EmbedFamily(Family):
    name = "embed"

    def prepare(self, recipe: RecipeBase, acc: Accelerator, progress: Progress) -> None:
        assert isinstance(recipe, EmbedRecipe)
        self.recipe, self.acc = recipe, acc
        t0 = time.perf_counter()
        self.teacher, self.tokenizer = load_encoder(
            resolve_path(recipe.teacher.path), recipe.teacher.trust_remote_code
        )
        self.timing = {"load_s": time.perf_counter() - t0}
        self.rerank: RerankTask | None = None
        if is_rerank(recipe):
            self.rerank = RerankTask(recipe, self.teacher, self.tokenizer)
            self.init = self._student_init(recipe.seed)
            self.timing["prepare_s"] = time.perf_counter() - t0
            return
        d = recipe.data
        self.train_text = read_sentences(resolve_path(d.train), d.field, "data.train")
        self.heldout_text = read_sentences(resolve_path(d.heldout), d.field, "data.heldout")
        self.train_ids, self.train_mask = tokenise(self.tokenizer, self.train_text, d.max_length)
        self.held_ids, self.held_mask = tokenise(self.tokenizer, self.heldout_text, d.max_length)
        self.init = self._student_init(recipe.seed)
        self.teacher_held = encode(self.teacher, self.held_ids, self.held_mask, recipe.eval.batch_size)
        self.timing["prepare_s"] = time.perf_counter() - t0

    def _student_init(self, seed: int) -> SentenceEncoder:
        s = self.recipe.student
        if s.init == "prune":
            depth = len(self.teacher.blocks())
            layers = s.layers or evenly_spaced(depth, s.num_layers or max(1, depth // 2))
            self.layers: list[int] | None = layers
            return set_dropout(prune_depth(self.teacher, layers), s.dropout)
        self.layers = None
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            fresh = fresh_encoder(self.teacher, s.num_layers, s.hidden_size, s.heads, s.intermediate_size)
        return set_dropout(fresh, s.dropout)

    def make_method(self, cfg: MethodConfigBase, seed: int) -> Method:
        student = (
            self._student_init(seed) if self.recipe.student.init == "fresh" else copy.deepcopy(self.init)
        )
        if self.rerank is not None:
            return self.rerank.make_method(cfg, seed, student)
        if not isinstance(cfg, EmbedKDConfig):
            raise RecipeError(f"method {cfg.name!r} does not belong to the embedding family")
        ctx = EmbedContext(self.teacher, student, self.tokenizer, self.recipe.data.max_length)
        try:
            return EmbedKD(ctx, cfg)
        except ValueError as err:
            raise RecipeError(f"{cfg.display}: {err}") from None

    def make_stream(self, method: Method, seed: int) -> Stream:
        if self.rerank is not None:
            return self.rerank.make_stream(method, seed)
        return TextStream(self.train_ids, self.train_mask, self.recipe.data.batch_size, seed)

    def evaluate(self, method: Method | None, progress: Progress) -> dict[str, Any] | None:
        if self.rerank is not None:  # before training: the primary method's untrained scorer
            return self.rerank.evaluate(method or self.make_method(self.recipe.method, self.recipe.seed))
        e = self.recipe.eval
        student = method.student if isinstance(method, EmbedKD) else self.init
        student.eval()
        emb = encode(student, self.held_ids, self.held_mask, e.batch_size)
        speed = throughput(
            {"teacher": self.teacher, "student": student}, self.held_ids, self.held_mask, e.batch_size,
            e.throughput_repeats,
        )  # fmt: skip
        ratios = [s / t for s, t in zip(speed["student"], speed["teacher"], strict=True)]
        student.train()
        return {
            "spearman": pair_spearman(emb, self.teacher_held, e.max_pairs),
            f"recall_at_{e.recall_k}": neighbour_recall(emb, self.teacher_held, e.recall_k),
            "sentences_per_s": statistics.median(speed["student"]),
            "teacher_sentences_per_s": statistics.median(speed["teacher"]),
            "speedup": statistics.median(ratios),
            "speedup_runs": ratios,
        }

    def describe(self) -> dict[str, Any]:
        r = self.recipe
        data = (
            self.rerank.describe_data()
            if self.rerank is not None
            else {
                "embed": {
                    "train_sentences": len(self.train_text),
                    "heldout_sentences": len(self.heldout_text),
                }
            }
        )
        return {
            "teacher": r.teacher.path,
            "teacher_info": {"parameters": parameters(self.teacher), "layers": len(self.teacher.blocks())},
            "student": {
                "init": r.student.init,
                "layers": self.layers if self.layers is not None else len(self.init.blocks()),
                "width": self.init.width,
                "parameters": parameters(self.init),
            },
            "data": data,
        }

    def timings(self) -> dict[str, float]:
        return dict(self.timing)

    def result_columns(self) -> list[dict[str, str]]:
        if self.rerank is not None:
            return self.rerank.result_columns()
        k = self.recipe.eval.recall_k
        return [
            {"key": "spearman", "title": "Spearman vs teacher", "format": "num", "better": "higher"},
            {
                "key": f"recall_at_{k}",
                "title": f"recall@{k} of teacher's top-{k}",
                "format": "pct",
                "better": "higher",
            },
            {"key": "sentences_per_s", "title": "sentences/s", "format": "num", "better": "higher"},
            {"key": "speedup", "title": "speed-up vs teacher", "format": "num", "better": "higher"},
        ]

    def results_note(self) -> str:
        if self.rerank is not None:
            return self.rerank.results_note()
        e = self.recipe.eval
        return (
            f"On {len(self.heldout_text)} held-out sentences: Spearman correlation of the student's and the teacher's "
            f"cosine similarities over (up to {e.max_pairs}) pairs; the share of the teacher's {e.recall_k} nearest "
            "neighbours the student also ranks in its top k; encode throughput at batch "
            f"{e.batch_size}, student and teacher measured interleaved, {e.throughput_repeats} rounds (median)."
        )
