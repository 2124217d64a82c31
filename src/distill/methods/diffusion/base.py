"""What every diffusion method shares: the context the family hands it (noise path, frozen teacher,
a student factory), the student with an optional EMA copy (checkpointed, so resume is exact), the
sampler it is evaluated with, the teacher's guided x0, and the export as a diffusers model folder."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from distill.classifier.batches import ClassifierBatch
from distill.configs.diffusion import DiffusionMethodConfig
from distill.diffusion.models import Denoiser, guided_x0
from distill.diffusion.paths import NoisePath
from distill.diffusion.sampling import LabelledX0Fn, SamplerKind
from distill.io import write_json_atomic
from distill.methods.base import Method, Phase, StepContext

NOISE_PATH_FILE = "noise_path.json"
SAMPLES_FILE = "samples.safetensors"


@dataclass
class DiffusionContext:
    path: NoisePath
    shape: tuple[int, ...]
    classes: int  # 0: unconditional
    teacher: Denoiser | None  # frozen (its EMA weights), eval mode
    guidance: float  # the teacher's CFG scale for conditional targets
    make_student: Callable[[str, bool], Denoiser]  # (init: teacher | scratch, guidance input) -> fresh


@torch.no_grad()
def ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    for ep, p in zip(ema.parameters(), live.parameters(), strict=True):
        ep.lerp_(p.detach(), 1.0 - decay)
    for eb, b in zip(ema.buffers(), live.buffers(), strict=True):
        eb.copy_(b)


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    out = copy.deepcopy(module).eval()
    out.requires_grad_(False)
    return out


def save_denoiser(den: Denoiser, folder: Path, facts: dict[str, Any]) -> None:
    """A diffusers model folder (config.json + diffusion_pytorch_model.safetensors) and what sampling it
    needs: the noise path, sampler kind and steps, classes, sample shape."""
    from distill.diffusion.diffusers_teacher import DiffusersAdapter, save_adapter

    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(den.net, DiffusersAdapter):
        save_adapter(den.net, folder)
    else:
        den.net.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[operator]
    write_json_atomic(folder / NOISE_PATH_FILE, {"path": den.path.describe(), **facts})


class DiffusionMethod(Method):
    """A student Denoiser trained by a distillation method; evaluated through `x0_fn` with `sampler`."""

    def __init__(self, ctx: DiffusionContext, cfg: DiffusionMethodConfig) -> None:
        self.ctx, self.cfg, self.path = ctx, cfg, ctx.path
        self.student = ctx.make_student(cfg.init, self.guidance_input())
        self.ema: Denoiser | None = None
        self.samples: torch.Tensor | None = None  # the evaluation's samples, exported beside the student
        if cfg.ema is not None:
            self.ema = frozen_copy(self.student)  # type: ignore[assignment]

    # -------------------------------------------------------------- what subclasses may override

    def guidance_input(self) -> bool:
        """Whether the student reads a guidance scale (guidance distillation)."""
        return False

    @property
    def sampler(self) -> SamplerKind:
        return self.cfg.sampler  # type: ignore[return-value]

    @property
    def sample_steps(self) -> int:
        return self.cfg.steps

    def student_group(self) -> str:
        return next(iter(self.groups()))

    # -------------------------------------------------------------- shared machinery

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"student": self.student}

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"teacher": self.ctx.teacher} if self.ctx.teacher is not None else {}

    def loss_units(self, batch: Any, phase: Phase) -> float:
        return float(batch.x.shape[0])

    def labels(self, batch: ClassifierBatch) -> torch.Tensor | None:
        return batch.y if self.ctx.classes > 0 else None

    def native_mse(
        self,
        ctx: StepContext,
        batch: ClassifierBatch,
        labels: torch.Tensor | None,
        guidance: torch.Tensor | None = None,
        module: str = "student",
    ) -> torch.Tensor:
        """Per-row mean squared error of `module`'s raw output at the prepared (xt, t) against the
        prepared `target`: the regression every denoising-style method (and DMD's critic) trains."""
        e = batch.extra
        out = ctx.modules[module](e["xt"], e["t"], labels, guidance)
        return (out - e["target"]).pow(2).flatten(1).mean(1)

    def teacher_x0(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        assert self.ctx.teacher is not None, f"method {self.cfg.name} needs a teacher"
        return guided_x0(self.ctx.teacher, x, t, labels, self.ctx.guidance)

    def after_step(self, phase: Phase, step: int) -> None:
        if self.ema is not None and self.cfg.ema is not None and phase.group == self.student_group():
            ema_update(self.ema, self.student, self.cfg.ema)

    def eval_model(self) -> Denoiser:
        return self.ema if self.ema is not None else self.student

    def x0_fn(self, guidance: float | None = None) -> LabelledX0Fn:
        """(x, t, labels) -> x0 of the evaluated student (at guidance scale `guidance` if it reads one)."""
        model = self.eval_model().eval()

        def fn(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            g = torch.full((x.shape[0],), guidance, device=x.device) if guidance is not None else None
            return model.x0(x, t, labels, g)

        return fn

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])

    def export(self, folder: Path) -> None:
        facts = {"sampler": self.sampler, "steps": self.sample_steps, "classes": self.ctx.classes,
                 "shape": list(self.ctx.shape), "method": self.cfg.name}  # fmt: skip
        save_denoiser(self.eval_model(), folder, facts)
        if self.samples is not None:
            save_file({"samples": self.samples.contiguous()}, str(folder / SAMPLES_FILE))
        (folder / "method.json").write_text(json.dumps(self.cfg.model_dump(mode="json")), encoding="utf-8")
