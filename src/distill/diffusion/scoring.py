"""Sample quality as the report reads it. Toys: sliced Wasserstein distance and MMD to held-out data
and to the teacher's reference samples, mode coverage on the ring. Digits: the Fréchet distance and
precision / recall in the fixed judge's feature space against held-out images, and the judge's accuracy
on class-conditional samples (does a "3" look like a 3)."""

from __future__ import annotations

import torch

from distill.diffusion.data import DiffusionData
from distill.diffusion.judge import DigitsJudge
from distill.diffusion.metrics import (
    frechet_distance,
    mmd_rbf,
    mode_coverage,
    precision_recall,
    sliced_wasserstein,
)

TOY_COLUMNS = [
    {"key": "swd", "title": "SWD to data", "format": "num", "better": "lower"},
    {"key": "mmd", "title": "MMD² to data", "format": "num", "better": "lower"},
    {"key": "swd_teacher", "title": "SWD to teacher", "format": "num", "better": "lower"},
]
RING_COLUMNS = [
    {"key": "modes_covered", "title": "modes covered", "format": "pct", "better": "higher"},
    {"key": "on_mode", "title": "samples on a mode", "format": "pct", "better": "higher"},
]
DIGITS_COLUMNS = [
    {"key": "fid", "title": "FID (judge features)", "format": "num", "better": "lower"},
    {"key": "precision", "title": "precision", "format": "pct", "better": "higher"},
    {"key": "recall", "title": "recall", "format": "pct", "better": "higher"},
    {"key": "class_accuracy", "title": "judge acc. on class-conditional samples", "format": "pct",
     "better": "higher"},
]  # fmt: skip
SPEED_COLUMNS = [
    {"key": "steps", "title": "sampling steps", "format": "num", "better": "lower"},
    {"key": "samples_per_s", "title": "samples/s", "format": "num", "better": "higher"},
]


def primary_key(data: DiffusionData) -> str:
    """The one number "equal quality" is read on."""
    return "swd" if len(data.shape) == 1 else "fid"


def columns(data: DiffusionData) -> list[dict[str, str]]:
    if len(data.shape) > 1:
        return DIGITS_COLUMNS + SPEED_COLUMNS
    return TOY_COLUMNS + (RING_COLUMNS if data.modes is not None else []) + SPEED_COLUMNS


def eval_labels(data: DiffusionData, count: int) -> torch.Tensor | None:
    """Conditional samples cycle through the classes, so every class gets count / classes rows."""
    return torch.arange(count) % data.classes if data.classes > 0 else None


def score_samples(
    samples: torch.Tensor,
    data: DiffusionData,
    reference: torch.Tensor | None,
    judge: DigitsJudge | None,
    labels: torch.Tensor | None,
) -> dict[str, float]:
    samples = samples.float()
    if not bool(torch.isfinite(samples).all()):
        return {
            "non_finite": float(
                (~torch.isfinite(samples)).any(dim=tuple(range(1, samples.ndim))).float().mean()
            )
        }
    if len(data.shape) == 1:
        out = {
            "swd": sliced_wasserstein(samples, data.x_test),
            "mmd": mmd_rbf(samples[:1024], data.x_test[:1024]),
        }
        if reference is not None:
            out["swd_teacher"] = sliced_wasserstein(samples, reference)
        if data.modes is not None:
            out.update(mode_coverage(samples, data.modes, data.mode_radius))
        return out
    assert judge is not None
    with torch.no_grad():
        clipped = samples.clamp(-1, 1)
        feats, real = judge.features(clipped), judge.features(data.x_test)
        out = {"fid": frechet_distance(feats, real), **precision_recall(real, feats)}
        if labels is not None:
            out["class_accuracy"] = float((judge.head(feats).argmax(-1) == labels).float().mean())
    return out
