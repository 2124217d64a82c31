"""The report's figures: 2-D scatter plots of each method's samples beside the data and the teacher,
or a grid of conditional digit samples (one row per class)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distill.diffusion.data import DiffusionData
from distill.methods.diffusion.base import SAMPLES_FILE

SAMPLES_PLOT = "samples.png"


def _method_samples(run_dir: Path, summary: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for label in summary.get("methods", {}):
        files = sorted((run_dir / "methods" / label).glob(f"**/student/{SAMPLES_FILE}"))
        if files:
            out[label] = load_file(str(files[0]))["samples"]
    return out


def plot_samples(
    run_dir: Path, summary: dict[str, Any], data: DiffusionData, reference: torch.Tensor | None
) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"held-out data": data.x_test}
    if reference is not None:
        panels["teacher (reference sampler)"] = reference
    panels.update(_method_samples(run_dir, summary))
    if len(panels) < 2:
        return {}
    n = len(panels)
    if len(data.shape) == 1:
        fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.8), squeeze=False)
        lim = float(data.x_test.abs().max()) * 1.3
        for ax, (title, pts) in zip(axes[0], panels.items(), strict=True):
            pts = pts[:2048].float()
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), title=title, xticks=[], yticks=[])
            ax.title.set_fontsize(8)
        caption = (
            "Samples of each method (first seed) beside held-out data and the teacher's reference sampler"
        )
    else:
        classes = max(data.classes, 1)
        fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.4), squeeze=False)
        for ax, (title, imgs) in zip(axes[0], panels.items(), strict=True):
            ax.imshow(_grid(imgs, classes), cmap="gray", vmin=-1, vmax=1)
            ax.set(title=title, xticks=[], yticks=[])
            ax.title.set_fontsize(8)
        caption = "Digit samples, one row per class (first seed of each method), beside held-out images"
    fig.tight_layout()
    fig.savefig(run_dir / SAMPLES_PLOT, dpi=110)
    plt.close(fig)
    return {SAMPLES_PLOT: caption}


def _grid(images: torch.Tensor, classes: int, per_row: int = 8) -> torch.Tensor:
    """Rows i, i + classes, ... hold class i (the evaluation cycles labels), so row c of the grid is class c
    for samples; for held-out data the rows are simply consecutive images."""
    imgs = images[: classes * per_row].float().clamp(-1, 1)
    size = imgs.shape[-1]
    grid = torch.full((classes * size, per_row * size), -1.0)
    for i, img in enumerate(imgs):
        r, c = i % classes, i // classes
        grid[r * size : (r + 1) * size, c * size : (c + 1) * size] = img[0]
    return grid
