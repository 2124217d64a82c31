"""Learning-rate schedules: linear warm-up then cosine, linear or constant decay."""

from __future__ import annotations

import math

import torch


def lr_lambda(step: int, *, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the base LR after `step` optimizer steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    opt: torch.optim.Optimizer, *, total: int, warmup: int, kind: str
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, total=total, warmup=warmup, kind=kind)
    )
