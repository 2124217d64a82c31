"""`representation_kd`: logit KD plus the teacher's inside. Block outputs are matched through learned
projections where the widths differ (FitNets, Romero et al. 2015; Minitron's recovery, Muralidharan et al.
2024), and self-attention relations through relation heads so head counts may differ (MiniLM, Wang et al.
2020; MiniLMv2, Wang et al. 2021). Each relation term is recomputed in backward rather than stored, so
distilling many layers stays within one layer's relation memory."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distill.configs.compress import RepresentationKDConfig
from distill.data.batching import Batch
from distill.errors import CompatibilityError
from distill.losses.representation import expand_kv, hidden_state_loss, relation_kl_checkpointed
from distill.methods.base import METHODS, StepContext
from distill.methods.lm.base import LMContext
from distill.methods.lm.layer_map import attention_parts, layer_pairs, relation_heads
from distill.methods.lm.logit_kd import LogitKD
from distill.models.student import decoder_layers
from distill.models.taps import capture_outputs
from distill.teachers.live import LiveTeacherSource

_NEEDS = {"attention": ("query", "key"), "query": ("query",), "key": ("key",), "value": ("value",)}


class Projections(nn.Module):
    """Student-to-teacher width maps, one per matched student block; trained with the student and left out
    of the export."""

    def __init__(self, maps: dict[str, nn.Linear]) -> None:
        super().__init__()
        self.maps = nn.ModuleDict(maps)

    def forward(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return self.maps[key](x) if key in self.maps else x


def _projection(ds: int, dt: int, kept: list[int] | None) -> nn.Linear:
    """Student width -> teacher width. A width-pruned student starts from the inverse of its pruning
    (channel i back to the teacher channel it was cut from, the others 0), so the hidden loss begins as
    the loss of the pruned channels alone rather than of a random map."""
    proj = nn.Linear(ds, dt, bias=False)
    if kept is not None and len(kept) == ds and max(kept) < dt:
        with torch.no_grad():
            proj.weight.zero_()
            proj.weight[torch.tensor(kept), torch.arange(ds)] = 1.0
    return proj


def _widths(model: Any) -> dict[str, int]:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return {
        "heads": cfg.num_attention_heads,
        "kv_heads": kv,
        "query": cfg.num_attention_heads * head_dim,
        "key": kv * head_dim,
        "value": kv * head_dim,
        "hidden": cfg.hidden_size,
    }


@METHODS.register("representation_kd")
class RepresentationKD(LogitKD):
    name = "representation_kd"

    def __init__(self, cfg: RepresentationKDConfig, ctx: LMContext) -> None:
        super().__init__(cfg, ctx)
        if not isinstance(ctx.teacher, LiveTeacherSource):
            raise CompatibilityError(
                "teacher.kind: representation_kd reads the teacher's hidden states; use a live teacher"
            )
        self.rcfg = cfg
        self.teacher_source = ctx.teacher
        student, teacher = ctx.student, ctx.teacher.model
        s_blocks, t_blocks = decoder_layers(student, "student"), decoder_layers(teacher, "teacher.model")
        self.s_widths, self.t_widths = _widths(student), _widths(teacher)
        self.s_taps: dict[str, nn.Module] = {}
        self.t_taps: dict[str, nn.Module] = {}
        maps: dict[str, nn.Linear] = {}
        self.hidden_pairs: list[tuple[int, int]] = []
        if cfg.hidden is not None:
            self.hidden_pairs = layer_pairs(
                cfg.hidden.layers, len(s_blocks), len(t_blocks), ctx.layer_origin, "method.hidden.layers"
            )
            ds, dt = self.s_widths["hidden"], self.t_widths["hidden"]
            project = cfg.hidden.projection if cfg.hidden.projection is not None else ds != dt
            if not project and ds != dt:
                raise CompatibilityError(
                    f"method.hidden.projection: false, but the student's width {ds} differs from the teacher's {dt}"
                )
            for s, t in self.hidden_pairs:
                self.s_taps[f"block{s}"], self.t_taps[f"block{t}"] = s_blocks[s], t_blocks[t]
                if project:
                    maps[str(s)] = _projection(ds, dt, ctx.kept_channels)
        self.projector = Projections(maps)
        self.relation_pairs: list[tuple[int, int]] = []
        if cfg.relations is not None:
            self.relation_pairs = layer_pairs(
                cfg.relations.layers,
                len(s_blocks),
                len(t_blocks),
                ctx.layer_origin,
                "method.relations.layers",
            )
            needed = sorted({p for k in cfg.relations.kinds for p in _NEEDS[k]})
            for s, t in self.relation_pairs:
                s_parts, t_parts = (
                    attention_parts(s_blocks[s], "student"),
                    attention_parts(t_blocks[t], "teacher.model"),
                )
                for p in needed:
                    self.s_taps[f"{p}{s}"], self.t_taps[f"{p}{t}"] = s_parts[p], t_parts[p]
            related = [w[p] for w in (self.s_widths, self.t_widths) for p in needed]
            self.heads = relation_heads(cfg.relations.heads, related, "method.relations.heads")

    def modules(self) -> dict[str, nn.Module]:
        out = super().modules()
        if len(self.projector.maps):
            out["projector"] = self.projector
        return out

    def loss(self, ctx: StepContext, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        with capture_outputs(self.s_taps) as s_out:
            rows = self.student_rows(ctx, batch)
        with capture_outputs(self.t_taps) as t_out:
            signal = self.teacher_source.full_signal(batch, rows.select)
        loss, parts = self.logit_loss(ctx, rows, signal)
        hidden = self.rcfg.hidden
        if hidden is not None and hidden.weight > 0:
            project = ctx.modules.get("projector")
            term = rows.hidden.new_zeros(())
            for s, t in self.hidden_pairs:
                student = s_out[f"block{s}"][rows.select]
                if project is not None:
                    student = project(str(s), student)
                teacher = t_out[f"block{t}"][rows.select].to(student.dtype)
                term = term + hidden_state_loss(student, teacher, hidden.loss).sum()
            term = term / (len(self.hidden_pairs) * ctx.normalizer)
            loss = loss + hidden.weight * term
            parts["hidden"] = float(term.detach())
        relations = self.rcfg.relations
        if relations is not None and relations.weight > 0:
            term = self._relations(batch, rows.select, s_out, t_out) / ctx.normalizer
            loss = loss + relations.weight * term
            parts["relations"] = float(term.detach())
        return loss, parts

    def _relations(
        self,
        batch: Batch,
        select: torch.Tensor,
        s_out: dict[str, torch.Tensor],
        t_out: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Sum over relation kinds and matched blocks of the relation KL at the answer rows, averaged over
        the (kind, block) terms."""
        assert self.rcfg.relations is not None
        kinds = self.rcfg.relations.kinds
        keys = batch.attention_mask.bool() if batch.attention_mask is not None else torch.ones_like(select)
        total = select.new_zeros((), dtype=torch.float32)
        for s, t in self.relation_pairs:
            for kind in kinds:
                s_left, s_right = self._operands(kind, s_out, s, self.s_widths)
                t_left, t_right = self._operands(kind, t_out, t, self.t_widths)
                total = total + relation_kl_checkpointed(
                    s_left, s_right, t_left.detach(), t_right.detach(), keys, select, self.heads, causal=True
                )
        return total / (len(self.relation_pairs) * len(kinds))

    @staticmethod
    def _operands(
        kind: str, out: dict[str, torch.Tensor], block: int, widths: dict[str, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if kind == "attention":  # queries against keys, each key head repeated for the queries sharing it
            keys = expand_kv(out[f"key{block}"], widths["heads"], widths["kv_heads"])
            return out[f"query{block}"], keys
        return out[f"{kind}{block}"], out[f"{kind}{block}"]
