"""The embedding family's part for reranker distillation (`rerank_kd` recipes): pairs read and checked
disjoint, the teacher's embeddings of every training and held-out text computed once, held-out
candidate pools fixed, methods and streams built, and held-out numbers measured.

The split is the data files': `data.train` and `data.heldout` hold different pairs, and no held-out query
or passage text may occur in training (checked), so held-out numbers are on unseen queries and passages.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from distill.configs.base import MethodConfigBase
from distill.configs.embed import RerankKDConfig
from distill.embed.encoders import SentenceEncoder
from distill.embed.rerank_data import (
    RerankStream,
    check_disjoint,
    mine_hard_negatives,
    read_pairs,
    unit_scores,
)
from distill.embed.rerank_eval import (
    THROUGHPUT_PAIRS,
    make_pools,
    mrr_of_positive,
    pair_throughput,
    pool_metrics,
    score_pools,
)
from distill.embed.rerank_scorers import bi_scorer, embed_texts
from distill.errors import InputError, RecipeError
from distill.methods.base import Method
from distill.methods.embed.margin_mse import RerankContext, RerankKD
from distill.paths import resolve_path
from distill.recipe_base import RecipeBase
from distill.recipe_embed import EmbedRecipe


def is_rerank(recipe: RecipeBase) -> bool:
    """A reranking recipe (validation keeps rerank_kd apart from the sentence-embedding methods)."""
    return isinstance(recipe.method, RerankKDConfig)


class RerankTask:
    def __init__(
        self, recipe: EmbedRecipe, teacher: SentenceEncoder, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        d, e = recipe.data, recipe.eval
        self.recipe, self.teacher, self.tokenizer = recipe, teacher, tokenizer
        self.train = read_pairs(resolve_path(d.train), "data.train")
        self.held = read_pairs(resolve_path(d.heldout), "data.heldout")
        check_disjoint(self.train, self.held)

        def embed(texts: list[str]) -> torch.Tensor:
            return embed_texts(teacher.eval(), tokenizer, texts, e.batch_size, d.max_length)

        self.train_q, self.train_p = embed(self.train.queries), embed(self.train.passages)
        held_q, held_p = embed(self.held.queries), embed(self.held.passages)
        self.pool_size = min(e.rerank_pool, len(self.held.passages))
        self.pools, self.column = make_pools(unit_scores(held_q, held_p), self.held.positive, self.pool_size)
        self.teacher_scores = (held_q.unsqueeze(1) * held_p[self.pools]).sum(-1)
        self.k = min(e.recall_k, self.pool_size)
        self.teacher_scorer = bi_scorer(teacher, tokenizer, d.max_length)
        self._hard: dict[int, torch.Tensor] = {}

    def make_method(self, cfg: MethodConfigBase, seed: int, student: SentenceEncoder) -> RerankKD:
        assert isinstance(cfg, RerankKDConfig)
        ctx = RerankContext(self.train_q, self.train_p, self.tokenizer, self.recipe.data.max_length)
        try:
            return RerankKD(ctx, cfg, student, seed)
        except ValueError as err:
            raise RecipeError(f"{cfg.display}: {err}") from None

    def hard_negatives(self, depth: int, negatives: int) -> torch.Tensor:
        """Each training query's `depth` teacher-mined hard negatives (cached per depth)."""
        available = len(self.train.passages) - 1
        if available < negatives:
            raise InputError(
                f"data.train: {available + 1} distinct passages; negatives={negatives} needs at least {negatives + 1}"
            )
        depth = min(depth, available)
        if depth not in self._hard:
            scores = unit_scores(self.train_q, self.train_p)
            self._hard[depth] = mine_hard_negatives(scores, self.train.positive, depth)
        return self._hard[depth]

    def make_stream(self, method: Method, seed: int) -> RerankStream:
        assert isinstance(method, RerankKD)
        c, d = method.cfg, self.recipe.data
        return RerankStream(
            self.train, self.hard_negatives(c.mine_depth, c.negatives), self.tokenizer, kind=c.student_kind,
            batch_size=d.batch_size, negatives=c.negatives, in_batch=c.in_batch_negatives,
            max_length=d.max_length, seed=seed,
        )  # fmt: skip

    def evaluate(self, method: Method) -> dict[str, Any]:
        assert isinstance(method, RerankKD)
        e = self.recipe.eval
        method.set_training(False)
        scorer = method.scorer()
        scores = score_pools(scorer, self.held.queries, self.held.passages, self.pools, e.batch_size)
        out: dict[str, Any] = pool_metrics(scores, self.teacher_scores, self.column, self.k)
        out["teacher_mrr_at_10"] = mrr_of_positive(self.teacher_scores, self.column)
        flat = [
            (self.held.queries[q], self.held.passages[p])
            for q, row in enumerate(self.pools.tolist())
            for p in row
        ]
        queries, passages = (list(x) for x in zip(*flat[:THROUGHPUT_PAIRS], strict=True))
        scorers = {"teacher": self.teacher_scorer, "student": scorer}
        speed = pair_throughput(scorers, queries, passages, e.batch_size, e.throughput_repeats)
        method.set_training(True)
        ratios = [s / t for s, t in zip(speed["student"], speed["teacher"], strict=True)]
        out.update(
            pairs_per_s=statistics.median(speed["student"]),
            teacher_pairs_per_s=statistics.median(speed["teacher"]),
            speedup=statistics.median(ratios),
            speedup_runs=ratios,
        )
        return out

    def describe_data(self) -> dict[str, Any]:
        return {
            "rerank": {
                "train_pairs": len(self.train.queries),
                "train_passages": len(self.train.passages),
                "heldout_queries": len(self.held.queries),
                "heldout_passages": len(self.held.passages),
                "pool": self.pool_size,
            }
        }

    def result_columns(self) -> list[dict[str, str]]:
        def col(key: str, title: str, fmt: str = "num") -> dict[str, str]:
            return {"key": key, "title": title, "format": fmt, "better": "higher"}

        return [
            col("spearman", "Spearman vs teacher (per query)"),
            col(f"recall_at_{self.k}", f"recall@{self.k} of teacher's top-{self.k}", "pct"),
            col("ndcg_at_10", "NDCG@10 vs teacher"),
            col("mrr_at_10", "MRR@10 of the labelled positive"),
            col("pairs_per_s", "pairs/s"),
            col("speedup", "speed-up vs teacher"),
        ]

    def results_note(self) -> str:
        e = self.recipe.eval
        return (
            f"On {len(self.held.queries)} held-out queries, each reranking a pool of {self.pool_size} held-out "
            f"passages (its labelled positive and the teacher's {self.pool_size - 1} highest-scored others): "
            "Spearman of student vs teacher scores within each pool (mean over queries); the share of the "
            f"teacher's top-{self.k} the student also ranks top-{self.k}; NDCG@10 with the teacher's top 10 as "
            "graded relevance; MRR@10 of the labelled positive (ties count against the student; the teacher's "
            "own is in eval.json as teacher_mrr_at_10). Before training: the primary method's untrained "
            f"student. Speed: pairs scored per second (tokenisation included) on the first {THROUGHPUT_PAIRS} "
            f"held-out pairs in batches of {e.batch_size}, student and teacher (a bi-encoder: each batch's "
            f"distinct queries and passages encoded once) interleaved, {e.throughput_repeats} rounds (median)."
        )
