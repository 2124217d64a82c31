"""Sentence-embedding distillation: the student encoder learns the teacher's embeddings (element-wise
through an optional projection), its in-batch similarity structure, and its last layer's self-relations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from distill.configs.embed import EmbedKDConfig
from distill.embed.encoders import SentenceEncoder, export_sentence_transformers
from distill.embed.text import TextBatch
from distill.losses.embedding import (
    cosine_embedding_loss,
    embedding_mse_loss,
    relation_kl_loss,
    similarity_kl_loss,
    similarity_mse_loss,
)
from distill.methods.base import METHODS, Method, Phase, StepContext

RELATIONS = ("query", "key", "value")


@dataclass
class EmbedContext:
    teacher: SentenceEncoder
    student: SentenceEncoder  # a fresh copy per method
    tokenizer: PreTrainedTokenizerBase
    max_length: int


class RelationTaps:
    """Forward hooks on the last block's query / key / value projections: what MiniLMv2 relates."""

    def __init__(self, encoder: SentenceEncoder) -> None:
        attention = getattr(encoder.blocks()[-1], "attention", None)
        inner = getattr(attention, "self", None)
        if inner is None or not all(isinstance(getattr(inner, n, None), nn.Module) for n in RELATIONS):
            raise ValueError("relations: the encoder's last block has no attention.self.query/key/value")
        self.outputs: dict[str, torch.Tensor] = {}
        for name in RELATIONS:
            getattr(inner, name).register_forward_hook(self._keep(name))

    def _keep(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self.outputs[name] = output

        return hook


@METHODS.register("embed_kd")
class EmbedKD(Method):
    name = "embed_kd"

    def __init__(self, ctx: EmbedContext, cfg: EmbedKDConfig) -> None:
        self.ctx, self.cfg = ctx, cfg
        self.student = ctx.student
        self._modules: dict[str, nn.Module] = {"student": self.student}
        if cfg.projection:
            self._modules["projection"] = nn.Linear(self.student.width, ctx.teacher.width)
        self.teacher_taps = RelationTaps(ctx.teacher) if cfg.relations > 0 else None
        self.student_taps = RelationTaps(self.student) if cfg.relations > 0 else None

    def modules(self) -> dict[str, nn.Module]:
        return self._modules

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.ctx.teacher}

    @torch.no_grad()
    def prepare(self, batch: TextBatch, phase: Phase) -> TextBatch:
        self.ctx.teacher.eval()
        signal = {"embedding": self.ctx.teacher(batch.ids, batch.mask)}
        if self.teacher_taps is not None:
            signal.update(self.teacher_taps.outputs)
        batch.teacher = signal
        return batch

    def loss_units(self, batch: TextBatch, phase: Phase) -> float:
        return float(batch.ids.shape[0])

    def _terms(
        self, student: torch.Tensor, teacher: torch.Tensor, projection: nn.Module | None, prefix: bool
    ) -> dict[str, torch.Tensor]:
        """The embedding-level terms (per sample) for one student prefix (`prefix`: a Matryoshka slice)."""
        c, out = self.cfg, {}
        # The projection maps the full student width, so a Matryoshka prefix gets the similarity terms only.
        if (c.mse > 0 or c.cosine > 0) and not (prefix and projection is not None):
            if projection is not None:
                target, mapped = teacher, projection(student)
            else:
                target, mapped = teacher[:, : student.shape[1]], student
            if c.mse > 0:
                out["mse"] = c.mse * embedding_mse_loss(mapped, target)
            if c.cosine > 0:
                out["cosine"] = c.cosine * cosine_embedding_loss(mapped, target)
        if c.similarity > 0:
            out["similarity"] = c.similarity * similarity_kl_loss(student, teacher, c.temperature)
        if c.similarity_mse > 0:
            out["similarity_mse"] = c.similarity_mse * similarity_mse_loss(student, teacher)
        return out

    def loss(self, ctx: StepContext, batch: TextBatch) -> tuple[torch.Tensor, dict[str, float]]:
        assert batch.teacher is not None, "prepare fills the teacher's signal"
        student = ctx.modules["student"](batch.ids, batch.mask)
        teacher = batch.teacher["embedding"]
        projection = ctx.modules.get("projection")
        terms = self._terms(student, teacher, projection, prefix=False)
        for d in self.cfg.matryoshka_dims:
            for key, value in self._terms(student[:, :d], teacher, projection, prefix=True).items():
                terms[f"{key}@{d}"] = value
        if self.student_taps is not None:
            real = batch.mask.bool()
            per_row = sum(
                relation_kl_loss(
                    self.student_taps.outputs[n], batch.teacher[n], real, self.cfg.relation_heads
                )
                for n in RELATIONS
            )
            assert isinstance(per_row, torch.Tensor)
            terms["relations"] = self.cfg.relations * per_row / real.sum(1).clamp_min(1)
        total = torch.stack([t.sum() for t in terms.values()]).sum() / ctx.normalizer
        return total, {k: float(v.detach().mean()) for k, v in terms.items()}

    def export(self, folder: Path) -> None:
        export_sentence_transformers(self.student, self.ctx.tokenizer, folder, self.ctx.max_length)
