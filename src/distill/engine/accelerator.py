"""The Accelerator a run trains under: device, precision, trackers, process group."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from accelerate import Accelerator

from distill.errors import RecipeError
from distill.recipe import TrainConfig

_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def make_accelerator(cfg: TrainConfig, run_dir: Path) -> Accelerator:
    for tracker in cfg.trackers:
        package = _TRACKER_PACKAGES[tracker]
        if importlib.util.find_spec(package) is None:
            raise RecipeError(
                f"train.trackers: {tracker!r} needs the {package} package (pip install {package})"
            )
    return Accelerator(
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        cpu=not torch.cuda.is_available(),
        log_with=list(cfg.trackers) or None,
        project_dir=str(run_dir),
    )


def zero_stage(acc: Accelerator) -> int | None:
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return None if plugin is None else int(getattr(plugin, "zero_stage", 0) or 0)
