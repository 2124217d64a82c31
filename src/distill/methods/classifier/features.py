"""Feature methods: the recipe names student and teacher modules by path, forward hooks read them, and
each pair's loss compares them (through a learned projector where shapes differ). FitNet, attention
transfer, RKD, PKT, CRD (with an optional bounded memory bank) and ND; Hinton KD may be added by weight."""

from __future__ import annotations

from typing import Any

import torch

from distill.classifier.batches import ClassifierBatch
from distill.classifier.hooks import FeatureTaps
from distill.configs.classifier import (
    ATConfig,
    CRDConfig,
    FitNetConfig,
    NDConfig,
    PKTConfig,
    RKDConfig,
)
from distill.errors import RecipeError
from distill.losses.classifier_logits import kd_loss
from distill.losses.features import (
    MemoryBank,
    attention_transfer_loss,
    crd_loss,
    fitnet_loss,
    nd_loss,
    pkt_loss,
    rkd_loss,
)
from distill.methods.base import METHODS, Phase, StepContext
from distill.methods.classifier.base import ClassifierContext, ClassifierMethod
from distill.methods.classifier.logits import hard_targets, teacher_logits_single
from distill.methods.classifier.projectors import (
    MapProjector,
    ProjectorBank,
    VectorProjector,
    as_map,
    as_vector,
    common_size,
    pool_to,
)

FeatureConfig = FitNetConfig | ATConfig | RKDConfig | PKTConfig | CRDConfig | NDConfig


def probe_shapes(
    model: torch.nn.Module, paths: list[str], in_shape: list[int], role: str
) -> dict[str, tuple[int, ...]]:
    """Each path's output shape for a 2-sample batch (one no-grad forward; the model's mode is kept)."""
    taps = FeatureTaps(model, paths, role)
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(2, *in_shape, dtype=p.dtype, device=p.device))
        return {path: tuple(taps.outputs[path].shape) for path in paths}
    finally:
        taps.remove()
        model.train(was_training)


class FeatureKD(ClassifierMethod):
    """Base of the hook-based methods: taps, per-pair projectors, optional Hinton KD term."""

    def __init__(self, ctx: ClassifierContext, cfg: FeatureConfig) -> None:
        super().__init__(ctx, cfg)
        assert ctx.teacher is not None
        s_paths, t_paths = [p.student for p in cfg.pairs], [p.teacher for p in cfg.pairs]
        try:
            s_shapes = probe_shapes(ctx.student, s_paths, ctx.spec["in_shape"], "student")
            t_shapes = probe_shapes(ctx.teacher.live, t_paths, ctx.spec["in_shape"], "teacher")
        except ValueError as err:
            raise RecipeError(f"{cfg.name}: {err}") from None
        projectors: dict[str, torch.nn.Module] = {}
        for i, pair in enumerate(cfg.pairs):
            proj = self.make_projector(s_shapes[pair.student], t_shapes[pair.teacher])
            if proj is not None and cfg.projector == "none":
                raise RecipeError(
                    f"pairs.{i}: student {pair.student!r} gives {s_shapes[pair.student]}, teacher {pair.teacher!r} gives "
                    f"{t_shapes[pair.teacher]}; projector: none needs shapes the loss can compare directly"
                )
            if proj is not None:
                projectors[str(i)] = proj
        self.projectors = ProjectorBank(projectors)
        self.student_taps = FeatureTaps(ctx.student, s_paths, "student")
        self.teacher_taps = FeatureTaps(ctx.teacher.live, t_paths, "teacher")

    def make_projector(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> torch.nn.Module | None:
        """Default (FitNet): a 1x1 conv on maps when channels or resolution differ."""
        s_map, t_map = as_map(torch.zeros(s_shape)), as_map(torch.zeros(t_shape))
        if s_map.shape[1:] == t_map.shape[1:]:
            return None
        return MapProjector(s_map.shape[1], t_map.shape[1], common_size(s_map, t_map))

    def extras(self) -> dict[str, torch.nn.Module]:
        return {"projectors": self.projectors} if len(self.projectors) else {}

    def prepare(self, batch: ClassifierBatch, phase: Phase) -> ClassifierBatch:
        batch = super().prepare(batch, phase)  # the teacher's forward fills its taps
        for i, pair in enumerate(self.cfg.pairs):
            batch.extra[f"t{i}"] = self.teacher_taps.take(pair.teacher).detach()
        return batch

    def pair_loss(
        self, i: int, s: torch.Tensor, t: torch.Tensor, batch: ClassifierBatch, ctx: StepContext
    ) -> torch.Tensor:
        """Pair i's loss summed over the batch; `s` is already projected."""
        raise NotImplementedError

    def extra_loss(
        self, ctx: StepContext, batch: ClassifierBatch, logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raw = {str(i): self.student_taps.take(pair.student) for i, pair in enumerate(self.cfg.pairs)}
        projected = ctx.modules["projectors"](raw) if "projectors" in ctx.modules else raw
        feat = logits.sum() * 0.0
        for i in range(len(self.cfg.pairs)):
            feat = feat + self.pair_loss(i, projected[str(i)], batch.extra[f"t{i}"], batch, ctx)
        total, parts = self.cfg.feature_weight * feat, {self.name: feat}
        if self.cfg.kd_weight > 0:
            assert batch.teacher_logits is not None
            kd = kd_loss(logits, teacher_logits_single(batch.teacher_logits), self.cfg.temperature).sum()
            total, parts = total + self.cfg.kd_weight * kd, {**parts, "kd": kd}
        return total, parts


@METHODS.register("fitnet")
class FitNet(FeatureKD):
    name = "fitnet"

    def pair_loss(
        self, i: int, s: torch.Tensor, t: torch.Tensor, batch: ClassifierBatch, ctx: StepContext
    ) -> torch.Tensor:
        s_map, t_map = as_map(s), as_map(t)
        size = common_size(s_map, t_map)
        s_map, t_map = pool_to(s_map, size), pool_to(t_map, size)
        return fitnet_loss(s_map, t_map).sum() / s_map[0].numel()  # mean squared error per row


@METHODS.register("at")
class AttentionTransfer(FeatureKD):
    name = "at"

    def make_projector(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> torch.nn.Module | None:
        for role, shape in (("student", s_shape), ("teacher", t_shape)):
            m = as_map(torch.zeros(shape))
            if m.shape[2] * m.shape[3] < 2:
                raise RecipeError(
                    f"at: a {role} feature of shape {shape} has no spatial extent; attention transfer needs maps or tokens"
                )
        return None  # attention maps are channel-free

    def pair_loss(
        self, i: int, s: torch.Tensor, t: torch.Tensor, batch: ClassifierBatch, ctx: StepContext
    ) -> torch.Tensor:
        assert isinstance(self.cfg, ATConfig)
        s_map, t_map = as_map(s), as_map(t)
        size = common_size(s_map, t_map)
        return attention_transfer_loss(pool_to(s_map, size), pool_to(t_map, size), self.cfg.p).sum()


@METHODS.register("rkd")
class RelationalKD(FeatureKD):
    name = "rkd"

    def make_projector(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> torch.nn.Module | None:
        return None  # relations between samples compare across widths

    def pair_loss(
        self, i: int, s: torch.Tensor, t: torch.Tensor, batch: ClassifierBatch, ctx: StepContext
    ) -> torch.Tensor:
        assert isinstance(self.cfg, RKDConfig)
        value = rkd_loss(as_vector(s), as_vector(t), self.cfg.distance_weight, self.cfg.angle_weight)
        return value * s.shape[0]  # a batch mean, as a sum


@METHODS.register("pkt")
class ProbabilisticKT(RelationalKD):
    name = "pkt"

    def pair_loss(
        self, i: int, s: torch.Tensor, t: torch.Tensor, batch: ClassifierBatch, ctx: StepContext
    ) -> torch.Tensor:
        return pkt_loss(as_vector(s), as_vector(t)) * s.shape[0]


@METHODS.register("crd")
class ContrastiveRD(FeatureKD):
    """Student and teacher embeddings are projected to `embed_dim` by trained heads (as in CRD); the
    memory bank holds past teacher projections, bounded in size, in the checkpointed state."""

    name = "crd"

    def __init__(self, ctx: ClassifierContext, cfg: CRDConfig) -> None:
        self._dim = cfg.embed_dim
        super().__init__(ctx, cfg)
        t_paths = [p.teacher for p in cfg.pairs]
        t_shapes = probe_shapes(ctx.teacher.live, t_paths, ctx.spec["in_shape"], "teacher")  # type: ignore[union-attr]
        heads = {
            str(i): VectorProjector(as_vector(torch.zeros(t_shapes[p])).shape[1], cfg.embed_dim)
            for i, p in enumerate(t_paths)
        }
        self.teacher_heads = ProjectorBank(heads)
        self.banks = (
            [MemoryBank(cfg.memory_size, cfg.embed_dim) for _ in cfg.pairs] if cfg.memory_size else []
        )

    def make_projector(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> torch.nn.Module | None:
        return VectorProjector(as_vector(torch.zeros(s_shape)).shape[1], self._dim)

    def extras(self) -> dict[str, torch.nn.Module]:
        return {"projectors": self.projectors, "teacher_heads": self.teacher_heads}

    def extra_loss(
        self, ctx: StepContext, batch: ClassifierBatch, logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        embedded = ctx.modules["teacher_heads"](
            {str(i): batch.extra[f"t{i}"] for i in range(len(self.cfg.pairs))}
        )
        batch.extra.update({f"crd{i}": e for i, e in embedded.items()})
        return super().extra_loss(ctx, batch, logits)

    def pair_loss(
        self, i: int, s: torch.Tensor, t: torch.Tensor, batch: ClassifierBatch, ctx: StepContext
    ) -> torch.Tensor:
        assert isinstance(self.cfg, CRDConfig)
        t_emb = batch.extra[f"crd{i}"]
        negatives = self.banks[i].negatives().to(t_emb.device) if self.banks else None
        value = crd_loss(s, t_emb, self.cfg.nce_temperature, negatives) * s.shape[0]
        if self.banks:
            self.banks[i].push(t_emb.detach())
        return value

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "banks": [b.state_dict() for b in self.banks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for bank, saved in zip(self.banks, state.get("banks", []), strict=False):
            bank.load_state_dict(saved)


@METHODS.register("nd")
class NormDirection(FeatureKD):
    """The teacher's class means are running means over the labelled rows seen so far (kept in the
    checkpointed state), so no extra pass over the data is needed."""

    name = "nd"

    def __init__(self, ctx: ClassifierContext, cfg: NDConfig) -> None:
        super().__init__(ctx, cfg)
        self.sums: dict[str, torch.Tensor] = {}  # per pair: the teacher's embedding sum per class
        self.counts: dict[str, torch.Tensor] = {}

    def make_projector(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> torch.nn.Module | None:
        d_s, d_t = (as_vector(torch.zeros(sh)).shape[1] for sh in (s_shape, t_shape))
        return None if d_s == d_t else VectorProjector(d_s, d_t)

    def pair_loss(
        self, i: int, s: torch.Tensor, t: torch.Tensor, batch: ClassifierBatch, ctx: StepContext
    ) -> torch.Tensor:
        assert isinstance(self.cfg, NDConfig) and batch.teacher_logits is not None
        t_emb = as_vector(t)
        target = hard_targets(batch, teacher_logits_single(batch.teacher_logits))
        key = str(i)
        if key not in self.sums:
            self.sums[key] = torch.zeros(self.ctx.classes, t_emb.shape[1], dtype=torch.float64)
            self.counts[key] = torch.zeros(self.ctx.classes, dtype=torch.float64)
        self.sums[key].index_add_(0, target.cpu(), t_emb.detach().cpu().double())
        self.counts[key].index_add_(0, target.cpu(), torch.ones(len(target), dtype=torch.float64))
        means = (self.sums[key] / self.counts[key].clamp(min=1)[:, None]).to(t_emb)
        s_emb = as_vector(s)
        return nd_loss(s_emb, t_emb, means, target, self.cfg.norm_weight, self.cfg.direction_weight).sum()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sums": self.sums, "counts": self.counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.sums, self.counts = dict(state.get("sums", {})), dict(state.get("counts", {}))
