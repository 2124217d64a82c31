"""Reranker distillation (Hofstätter et al. 2020, cross-architecture knowledge distillation): a smaller
scorer learns the teacher's score margins between each query's positive and its negatives (Margin-MSE),
optionally with a listwise KL over the query's candidates.

The teacher here is a bi-encoder, its score the cosine of query and passage embeddings; the family
embeds every training query and passage with it once (the teacher is deterministic), so preparing a
batch only looks its scores up. The student is a bi-encoder (the student encoder's cosine) or a
cross-encoder (the student encoder over the pair plus a linear head, exported with it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from distill.configs.embed import RerankKDConfig
from distill.embed.encoders import SentenceEncoder, export_sentence_transformers
from distill.embed.rerank_data import RerankBatch
from distill.embed.rerank_scorers import (
    BiBody,
    CrossBody,
    PairScorer,
    bi_scorer,
    bi_scores,
    cross_scorer,
    cross_scores,
    export_cross_encoder,
    score_head,
)
from distill.losses.ranking import listwise_kl_loss, margin_mse_loss
from distill.methods.base import METHODS, Method, Phase, StepContext


@dataclass
class RerankContext:
    teacher_queries: torch.Tensor  # (Q, D) unit-norm teacher embeddings of the training queries
    teacher_passages: torch.Tensor  # (P, D) ... of the distinct training passages
    tokenizer: PreTrainedTokenizerBase
    max_length: int


@METHODS.register("rerank_kd")
class RerankKD(Method):
    name = "rerank_kd"

    def __init__(self, ctx: RerankContext, cfg: RerankKDConfig, student: SentenceEncoder, seed: int) -> None:
        self.ctx, self.cfg, self.kind = ctx, cfg, cfg.student_kind
        self.encoder = student
        self._modules: dict[str, nn.Module]
        if self.kind == "cross":
            body = CrossBody(student.model)
            self._modules = {"student": body, "head": score_head(body.width, seed)}
        else:
            self._modules = {"student": BiBody(student)}

    def modules(self) -> dict[str, nn.Module]:
        return self._modules

    @torch.no_grad()
    def prepare(self, batch: RerankBatch, phase: Phase) -> RerankBatch:
        q = self.ctx.teacher_queries[batch.query.cpu()]
        p = self.ctx.teacher_passages[batch.candidates.cpu()]
        batch.teacher = (q.unsqueeze(1) * p).sum(-1).to(batch.query.device)
        return batch

    def loss_units(self, batch: RerankBatch, phase: Phase) -> float:
        return float(batch.query.shape[0])

    def scores(self, modules: dict[str, nn.Module], batch: RerankBatch) -> torch.Tensor:
        """The student's ``(B, C)`` scores of the batch's candidates."""
        if self.kind == "cross":
            shape = (batch.candidates.shape[0], batch.candidates.shape[1])
            return cross_scores(modules["student"], modules["head"], batch.tokens, shape)
        return bi_scores(modules["student"], batch.tokens)

    def loss(self, ctx: StepContext, batch: RerankBatch) -> tuple[torch.Tensor, dict[str, float]]:
        assert batch.teacher is not None, "prepare fills the teacher's scores"
        student, teacher, c = self.scores(ctx.modules, batch), batch.teacher, self.cfg
        terms: dict[str, torch.Tensor] = {}
        if c.margin_mse > 0:
            terms["margin_mse"] = c.margin_mse * margin_mse_loss(
                student[:, 0], student[:, 1:], teacher[:, 0], teacher[:, 1:]
            )
        if c.listwise > 0:
            terms["listwise"] = c.listwise * listwise_kl_loss(student, teacher, c.temperature)
        total = torch.stack([t.sum() for t in terms.values()]).sum() / ctx.normalizer
        with torch.no_grad():
            logs = {k: float(v.detach().mean()) for k, v in terms.items()}
            logs["positive_top1"] = float((student.argmax(1) == 0).float().mean())
        return total, logs

    def set_training(self, mode: bool) -> None:
        for module in self._modules.values():
            module.train(mode)

    def scorer(self) -> PairScorer:
        """The student as a text scorer (call `set_training(False)` first for evaluation)."""
        if self.kind == "cross":
            return cross_scorer(
                self._modules["student"], self._modules["head"], self.ctx.tokenizer, self.ctx.max_length
            )
        return bi_scorer(self.encoder, self.ctx.tokenizer, self.ctx.max_length)

    def export(self, folder: Path) -> None:
        if self.kind == "cross":
            body, head = self._modules["student"], self._modules["head"]
            assert isinstance(body, CrossBody) and isinstance(head, nn.Linear)
            export_cross_encoder(body, head, self.ctx.tokenizer, folder, self.ctx.max_length)
        else:
            export_sentence_transformers(self.encoder, self.ctx.tokenizer, folder, self.ctx.max_length)
