"""Trajectory matching (MTT, Cazenavette et al. 2022; FTD's flat experts, DATM's window) and SRe²L's
squeeze-recover-relabel (Yin et al. 2023): two ways to distil a set that need more than a random network
— expert trajectories trained on the real data, or a trained teacher."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.nn.functional as F

from distill.condense.experts import ExpertBuffer, train_experts
from distill.condense.trajectory import trajectory_loss, unroll
from distill.configs.condense import SRe2LConfig, TrajectoryMatchConfig
from distill.methods.base import METHODS, Phase, StepContext
from distill.methods.condense.base import CondenseContext, CondenseMethod, LearnedStep, RealBatch, SoftLabels
from distill.paths import resolve_path


@METHODS.register("mtt")
class TrajectoryMatching(CondenseMethod):
    """Each step: a random expert and start epoch (in the DATM window), `syn_steps` differentiable SGD
    steps on the synthetic set from there, and the distance to where the expert was `expert_epochs`
    later, normalised by how far the expert moved. Images, the step size (and soft labels) learn."""

    name = "mtt"
    cfg: TrajectoryMatchConfig

    def __init__(self, ctx: CondenseContext, cfg: TrajectoryMatchConfig) -> None:
        super().__init__(ctx, cfg)
        self.step_size = LearnedStep(cfg.syn_lr_init, ctx.lr_lr_scale)
        self.soft = (
            SoftLabels(F.one_hot(ctx.labels, ctx.classes).float() * 5.0, ctx.label_lr_scale)
            if cfg.soft_labels
            else None
        )
        self.buffer: ExpertBuffer | None = None

    def attach(self, family: Any, seed: int) -> None:
        """Train (once, stored by fingerprint under runs/.experts) or reuse the expert trajectories."""
        c, r = self.cfg, family.recipe
        what = {
            "data": r.data.model_dump(mode="json", exclude={"batch_size", "augment", "unlabelled"}),
            "network": r.network.model_dump(mode="json"),
            "experts": [c.experts, c.expert_epochs_total, c.expert_lr, c.flat_experts, c.expert_batch_size],
            "seed": r.seed,
            "version": 1,
        }
        key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
        folder = resolve_path("runs/.experts") / key
        self.buffer = ExpertBuffer(folder, c.expert_epochs, c.max_start_epoch, c.min_start_epoch)
        missing = c.experts - len(self.buffer)
        if missing > 0:
            family.progress.log(
                f"training {missing} expert trajectories ({c.expert_epochs_total} epochs each) into {folder}"
            )
            train_experts(
                self.buffer, missing, lambda: family.network(0), family.x, family.y, c.expert_epochs_total,
                c.expert_lr, c.expert_batch_size, seed=r.seed * 1000 + len(self.buffer), flat_penalty=c.flat_experts,
            )  # fmt: skip
        self.network = family.network(0)

    def modules(self) -> dict[str, torch.nn.Module]:
        extra = {"labels": self.soft} if self.soft is not None else {}
        return {"images": self.images, "step_size": self.step_size, **extra}

    def loss_units(self, batch: RealBatch, phase: Phase) -> float:
        return 1.0  # one trajectory match per step

    def prepare(self, batch: RealBatch, phase: Phase) -> RealBatch:
        assert self.buffer is not None
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        batch.extra["start"], batch.extra["target"] = self.buffer.sample(gen)
        batch.extra["gen"] = gen
        return batch

    def loss(self, ctx: StepContext, batch: RealBatch) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg
        images = ctx.modules["images"]()
        labels: torch.Tensor = self.ctx.labels.to(images.device)
        if self.soft is not None:
            labels = ctx.modules["labels"]().softmax(-1)
        start = {k: v.to(images.device) for k, v in batch.extra["start"].items()}
        target = {k: v.to(images.device) for k, v in batch.extra["target"].items()}
        final = unroll(
            self.network, start, images, labels, ctx.modules["step_size"](), c.syn_steps, None, batch.extra["gen"],
            mode=c.unroll, window=c.window if c.unroll == "truncate" else None,
        )  # fmt: skip
        value = trajectory_loss(final, start, target)
        return value / ctx.normalizer, {
            "mtt": float(value.detach()),
            "syn_lr": float(self.step_size().detach()),
        }

    def synthetic(self) -> dict[str, torch.Tensor]:
        out = super().synthetic()
        out["lr"] = self.step_size().detach().cpu().reshape(1)
        if self.soft is not None:
            out["soft_labels"] = self.soft().detach().softmax(-1).cpu()
        return out


@METHODS.register("sre2l")
class SqueezeRecoverRelabel(CondenseMethod):
    """Recover: images whose statistics at every batch-norm layer of the trained teacher match its running
    statistics, while it classifies them as their class. Relabel: the teacher's soft labels."""

    name = "sre2l"
    cfg: SRe2LConfig

    def __init__(self, ctx: CondenseContext, cfg: SRe2LConfig) -> None:
        super().__init__(ctx, cfg)
        assert ctx.teacher is not None, "sre2l needs a teacher"
        live = getattr(ctx.teacher, "live", ctx.teacher)  # the one model of a TeacherNet
        assert isinstance(live, torch.nn.Module)
        self.teacher: torch.nn.Module = live
        self.norms = [
            m for m in self.teacher.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ]
        self.stats: list[torch.Tensor] = []
        for bn in self.norms:
            bn.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _out: object) -> None:
        x = inputs[0]
        dims = [0, *range(2, x.dim())]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        assert isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        assert module.running_mean is not None and module.running_var is not None
        self.stats.append((mean - module.running_mean).norm() + (var - module.running_var).norm())

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"teacher": self.teacher}

    def loss_units(self, batch: RealBatch, phase: Phase) -> float:
        return 1.0

    def loss(self, ctx: StepContext, batch: RealBatch) -> tuple[torch.Tensor, dict[str, float]]:
        images = ctx.modules["images"]()
        self.stats = []
        self.teacher.eval()
        ce = F.cross_entropy(self.teacher(images), self.ctx.labels.to(images.device))
        bn = torch.stack(self.stats).sum() if self.stats else ce * 0.0
        value = ce + self.cfg.bn_weight * bn
        return value / ctx.normalizer, {"ce": float(ce.detach()), "bn": float(bn.detach())}

    def synthetic(self) -> dict[str, torch.Tensor]:
        out = super().synthetic()
        if self.cfg.relabel:
            with torch.no_grad():
                out["soft_labels"] = (
                    self.teacher.eval()(out["images"].to(next(self.teacher.parameters()).device))
                    .softmax(-1)
                    .cpu()
                )
        return out
