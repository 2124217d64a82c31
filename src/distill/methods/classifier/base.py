"""What every classifier method shares: a plain `nn.Module` student, a frozen teacher read in the
no-grad preparation step (after augmentation, so teacher and student see the same pixels), samples as
loss units, best-on-validation snapshots in the after-step hook, export as safetensors + config."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from distill.classifier.augment import Augment
from distill.classifier.batches import ClassifierBatch
from distill.io import atomic_folder
from distill.methods.base import Method, Phase, StepContext


class TeacherNet(torch.nn.Module):
    """The frozen teacher signal: live models (one, or an ensemble whose members the method averages) or a
    table of precomputed logits by row (a GNN teacher, whose forward needs the whole graph)."""

    def __init__(
        self, models: list[torch.nn.Module] | None = None, table: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.models = torch.nn.ModuleList(models or [])
        self.register_buffer("table", table if table is not None else torch.empty(0), persistent=False)
        self.eval().requires_grad_(False)

    @property
    def live(self) -> torch.nn.Module:
        """The one live model (feature methods read its modules)."""
        return self.models[0]

    table: torch.Tensor

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(M, B, C): each member's logits for the batch."""
        if len(self.models) == 0:
            return self.table[index].unsqueeze(0)
        return torch.stack([m(x) for m in self.models])


@dataclass
class ClassifierContext:
    """What the classifier family hands each method it builds."""

    student: torch.nn.Module
    teacher: TeacherNet | None
    classes: int
    spec: dict[str, Any]  # {arch, options, in_shape, classes}: rebuilds the exported student
    augment: Augment | None = None
    validation: tuple[torch.Tensor, torch.Tensor] | None = None
    eval_every: int = 0


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in eval mode; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            pred = model(x[i : i + batch_size].to(device)).argmax(-1).cpu()
            correct += int((pred == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(y))


class ClassifierMethod(Method):
    """Base of the classifier methods. Subclasses add terms in `extra_loss` (and modules in `extras`)."""

    uses_teacher = True
    uses_unlabelled = True  # teacher-supervised methods may train on rows whose label is withheld

    def __init__(self, ctx: ClassifierContext, cfg: Any) -> None:
        """`cfg` is the method's config (a ClassifierMethodConfig: its ce_weight weighs the labels)."""
        self.ctx, self.student, self.cfg, self.ce_weight = ctx, ctx.student, cfg, float(cfg.ce_weight)
        self.best: dict[str, Any] = {"accuracy": -1.0, "step": None, "state": None}
        if self.uses_teacher and ctx.teacher is None:
            raise ValueError(f"method {self.name!r} needs a teacher")

    def extras(self) -> dict[str, torch.nn.Module]:
        """Trainable modules besides the student (projectors, exit branches); dropped at export."""
        return {}

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"student": self.student, **self.extras()}

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"teacher": self.ctx.teacher} if self.uses_teacher and self.ctx.teacher is not None else {}

    def prepare(self, batch: ClassifierBatch, phase: Phase) -> ClassifierBatch:
        if self.ctx.augment is not None:
            gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
            onehot = F.one_hot(batch.y.clamp(min=0), self.ctx.classes).to(batch.x.dtype)
            x, targets = self.ctx.augment(batch.x.cpu(), onehot.cpu(), gen)
            batch.x, batch.targets = x.to(batch.x.device), targets.to(batch.x.device)
        if self.uses_teacher and self.ctx.teacher is not None:
            batch.teacher_logits = self.teacher_signal(batch)
        return batch

    def teacher_signal(self, batch: ClassifierBatch) -> torch.Tensor:
        assert self.ctx.teacher is not None
        return self.ctx.teacher(batch.x, batch.index)

    def loss_units(self, batch: ClassifierBatch, phase: Phase) -> float:
        return float(batch.y.shape[0])

    def cross_entropy(self, logits: torch.Tensor, batch: ClassifierBatch) -> torch.Tensor:
        """Summed over the labelled rows (mixed targets after mixup / cutmix)."""
        mask = batch.labelled
        if not bool(mask.any()):
            return logits.sum() * 0.0
        if batch.targets is not None:
            return -(batch.targets[mask] * F.log_softmax(logits[mask], -1)).sum()
        return F.cross_entropy(logits[mask], batch.y[mask], reduction="sum")

    def forward_student(self, ctx: StepContext, batch: ClassifierBatch) -> torch.Tensor:
        return ctx.modules["student"](batch.x)

    def extra_loss(
        self, ctx: StepContext, batch: ClassifierBatch, logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The method's own terms, summed over the batch's rows; named parts to log."""
        zero = logits.sum() * 0.0
        return zero, {}

    def loss(self, ctx: StepContext, batch: ClassifierBatch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.forward_student(ctx, batch)
        total, parts = self.extra_loss(ctx, batch, logits)
        if self.ce_weight > 0:
            ce = self.cross_entropy(logits, batch)
            total = total + self.ce_weight * ce
            parts = {**parts, "ce": ce}
        n = ctx.normalizer
        return total / n, {k: float(v.detach()) / n for k, v in parts.items()}

    def after_step(self, phase: Phase, step: int) -> None:
        every, val = self.ctx.eval_every, self.ctx.validation
        if every and val is not None and (step + 1) % every == 0:
            acc = accuracy(self.student, *val)
            if acc > self.best["accuracy"]:
                state = {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}
                self.best = {"accuracy": acc, "step": step + 1, "state": state}

    def state_dict(self) -> dict[str, Any]:
        return {"best": copy.copy(self.best)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "best" in state:
            self.best = dict(state["best"])

    def best_student(self) -> torch.nn.Module | None:
        """The student at its best validation accuracy (None when validation was not tracked)."""
        if self.best["state"] is None:
            return None
        model = copy.deepcopy(self.student)
        model.load_state_dict(self.best["state"])
        return model.eval()

    def export(self, folder: Path) -> None:
        """model.safetensors (a plain state_dict) + config.json; projectors and branches stay out."""
        with atomic_folder(folder) as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in self.student.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(self.ctx.spec, indent=2), encoding="utf-8")
