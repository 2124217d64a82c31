"""The dataset-distillation report's figure: every method's distilled images, one row per class, beside
real training images of that class, so a reader sees what each set holds (matplotlib, no pyplot)."""

from __future__ import annotations

from pathlib import Path

import torch

from distill.io import write_with

GRID_PLOT = "synthetic_sets.png"


def _show(ax: object, image: torch.Tensor) -> None:
    img = image.float()
    img = (img - img.min()) / (img.max() - img.min()).clamp(min=1e-8)
    pic = img[0] if img.shape[0] == 1 else img[:3].permute(1, 2, 0)
    ax.imshow(pic.numpy(), cmap="gray" if img.shape[0] == 1 else None)  # type: ignore[attr-defined]
    ax.set_xticks([])  # type: ignore[attr-defined]
    ax.set_yticks([])  # type: ignore[attr-defined]


def plot_sets(
    sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    real: tuple[torch.Tensor, torch.Tensor],
    classes: int,
    path: Path,
    per_class: int = 3,
) -> bool:
    """`sets`: label -> (images, labels); `real`: (images, labels) of the training data. Shows up to
    `per_class` images of each class per set, real ones first."""
    if not sets or real[0].dim() != 4:
        return False
    from matplotlib.figure import Figure

    columns = [("real", real), *sets.items()]
    widths = [min(per_class, max(int((lab == c).sum()) for c in range(classes))) for _, (_, lab) in columns]
    starts = [sum(widths[:j]) for j in range(len(widths))]
    fig = Figure(figsize=(1.0 * sum(widths) + 1, 0.9 * classes + 1))
    grid = fig.add_gridspec(classes, sum(widths), wspace=0.05, hspace=0.05)
    for j, (label, (images, labels)) in enumerate(columns):
        for c in range(classes):
            picks = images[labels == c][: widths[j]]
            for k in range(widths[j]):
                ax = fig.add_subplot(grid[c, starts[j] + k])
                if k < len(picks):
                    _show(ax, picks[k])
                else:
                    ax.axis("off")
                if c == 0 and k == 0:
                    ax.set_title(label, fontsize=8, loc="left")
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    return True
