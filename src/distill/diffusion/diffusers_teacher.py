"""A teacher from a diffusers folder: a model (`unet/` or `transformer/`, any diffusers class whose
forward takes (sample, timestep[, class_labels]) and returns `.sample`) and the scheduler it was trained
with (`scheduler/scheduler_config.json`). The scheduler decides the noise path and how the model's
output reads: flow matching (FlowMatchEulerDiscreteScheduler, shift 1: our flow path exactly) or a
discrete VP schedule (DDPM / DDIM / Euler-discrete betas, epsilon / v / sample prediction), mapped onto
the continuous VP path by matching the signal-to-noise ratio: our t gives alpha, the schedule's
alphas_cumprod the fractional timestep with that alpha, and the prediction is converted to v."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.diffusion.paths import NoisePath
from distill.errors import InputError

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                 "PNDMScheduler")  # fmt: skip


def is_diffusers_folder(folder: Path) -> bool:
    return (folder / "scheduler" / "scheduler_config.json").exists()


class DiffusersAdapter(nn.Module):
    """Wraps a diffusers model so it answers in this family's convention: input (x, 1000 t, labels)
    on `path`, output the path's native parameterisation (velocity for flow, v for VP)."""

    log_snr: torch.Tensor  # the schedule's log SNR by reversed timestep (increasing)

    def __init__(
        self,
        model: nn.Module,
        kind: str,
        train_steps: int,
        prediction: str,
        alphas_cumprod: torch.Tensor | None,
        scheduler_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model, self.kind, self.train_steps, self.prediction = model, kind, train_steps, prediction
        self.scheduler_config = scheduler_config or {}
        if alphas_cumprod is not None:
            self.register_buffer(
                "log_snr", torch.log(alphas_cumprod / (1 - alphas_cumprod)).flip(0), persistent=False
            )
        self.path = NoisePath(kind="flow" if kind == "flow" else "vp")

    def _timestep(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "flow":
            return t * self.train_steps
        a, s = self.path.alpha(t), self.path.sigma(t)
        snr = torch.log(a.clamp_min(1e-6) ** 2 / s.clamp_min(1e-6) ** 2)
        # log_snr is increasing after the flip: position i <-> timestep train_steps - 1 - i
        lo = torch.searchsorted(self.log_snr, snr.clamp(self.log_snr[0], self.log_snr[-1]))
        lo = lo.clamp(1, len(self.log_snr) - 1)
        a_lo, a_hi = self.log_snr[lo - 1], self.log_snr[lo]
        frac = ((snr - a_lo) / (a_hi - a_lo).clamp_min(1e-12)).clamp(0, 1)
        pos = (lo - 1).float() + frac
        return (len(self.log_snr) - 1) - pos

    def _scheduler_alpha_sigma(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_snr = torch.lerp(
            self.log_snr[(len(self.log_snr) - 1 - timestep.floor()).long().clamp(0, len(self.log_snr) - 1)],
            self.log_snr[(len(self.log_snr) - 1 - timestep.ceil()).long().clamp(0, len(self.log_snr) - 1)],
            timestep - timestep.floor(),
        )
        alpha2 = torch.sigmoid(log_snr)
        return alpha2.sqrt(), (1 - alpha2).sqrt()

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = timestep / 1000.0
        step = self._timestep(t)
        kwargs = {"class_labels": class_labels} if class_labels is not None else {}
        out = self.model(sample, step, **kwargs).sample
        if self.kind == "flow":
            return out  # type: ignore[no-any-return]
        a, s = (v.reshape(-1, *([1] * (sample.ndim - 1))) for v in self._scheduler_alpha_sigma(step))
        if self.prediction == "epsilon":
            eps, x0 = out, (sample - s * out) / a
        elif self.prediction == "sample":
            x0, eps = out, (sample - a * out) / s
        else:  # v_prediction
            x0, eps = a * sample - s * out, s * sample + a * out
        pa, ps = (v.reshape(-1, *([1] * (sample.ndim - 1))) for v in (self.path.alpha(t), self.path.sigma(t)))
        return pa * eps - ps * x0  # our v on the continuous VP path


def load_diffusers_teacher(folder: Path, field: str) -> tuple[nn.Module, NoisePath]:
    """(network in this family's convention, its noise path) from a diffusers folder."""
    import diffusers

    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    name = sched.get("_class_name", "")
    sub = next((folder / d for d in ("unet", "transformer") if (folder / d / "config.json").exists()), None)
    if sub is None:
        raise InputError(f"{field}: {folder} has a scheduler but no unet/ or transformer/ model folder")
    model_class = json.loads((sub / "config.json").read_text(encoding="utf-8")).get("_class_name", "")
    cls = getattr(diffusers, model_class, None)
    if cls is None:
        raise InputError(f"{field}: {sub} holds a {model_class!r}, which diffusers does not define")
    steps = int(sched.get("num_train_timesteps", 1000))
    if name in FLOW_SCHEDULERS:
        if float(sched.get("shift", 1.0)) != 1.0 or sched.get("use_dynamic_shifting"):
            raise InputError(f"{field}: {name} with a shifted schedule is not supported (shift must be 1)")
        model = cls.from_pretrained(str(sub)).eval()
        return DiffusersAdapter(model, "flow", steps, "flow", None, sched), NoisePath(kind="flow")
    if name in VP_SCHEDULERS:
        scheduler = getattr(diffusers, name).from_pretrained(str(folder / "scheduler"))
        prediction = sched.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise InputError(f"{field}: prediction_type {prediction!r} is not supported")
        model = cls.from_pretrained(str(sub)).eval()
        alphas = scheduler.alphas_cumprod.double().float()
        return DiffusersAdapter(model, "vp", steps, prediction, alphas, sched), NoisePath(kind="vp")
    supported = ", ".join(FLOW_SCHEDULERS + VP_SCHEDULERS)
    raise InputError(f"{field}: scheduler {name!r} is not supported (supported: {supported})")


def save_adapter(adapter: DiffusersAdapter, folder: Path) -> None:
    """Export in the layout it was loaded from (model sub-folder + scheduler), so diffusers, and this
    family's `teacher.path`, load it again."""
    from distill.io import write_json_atomic

    adapter.model.save_pretrained(str(folder / "unet"), safe_serialization=True)  # type: ignore[operator]
    write_json_atomic(folder / "scheduler" / "scheduler_config.json", adapter.scheduler_config)


def scheduler_kind(folder: Path) -> str | None:
    """The noise path a diffusers folder's scheduler trains (flow | vp), None if unsupported."""
    name = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8")).get(
        "_class_name"
    )
    return "flow" if name in FLOW_SCHEDULERS else "vp" if name in VP_SCHEDULERS else None
