"""Put features of different architectures on one footing, and learn the map between them.

A CNN stage gives (B, C, H, W), a ViT block (B, N, D) tokens, an MLP layer (B, D). Maps keep their
layout; tokens become a map when their patch tokens form a square grid (a leading class token is
dropped); vectors are 1x1 maps. Two maps are compared at the coarser of their two resolutions (the finer
one is average-pooled), after a 1x1 convolution brings the student's channels to the teacher's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F


def as_map(feat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) view of a feature: maps as they are, square token grids as maps, vectors as 1x1."""
    if feat.dim() == 4:
        return feat
    if feat.dim() == 2:
        return feat[:, :, None, None]
    if feat.dim() == 3:
        n = feat.shape[1]
        for drop in (1, 0):
            side = math.isqrt(n - drop)
            if side * side == n - drop and side > 0:
                grid = feat[:, drop:, :]
                return grid.transpose(1, 2).reshape(feat.shape[0], feat.shape[2], side, side)
        return feat.transpose(1, 2)[:, :, :, None]
    raise ValueError(f"a feature of shape {tuple(feat.shape)} is not a map, a token sequence or a vector")


def as_vector(feat: torch.Tensor) -> torch.Tensor:
    """(B, D) embedding: maps and tokens averaged over their positions."""
    return as_map(feat).mean(dim=(2, 3))


def common_size(s: torch.Tensor, t: torch.Tensor) -> tuple[int, int]:
    return min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])


def pool_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[2:]) == size else F.adaptive_avg_pool2d(x, size)


class MapProjector(torch.nn.Module):
    """1x1 convolution from the student's channels to the teacher's (FitNet's regressor), then pooling to
    the common resolution."""

    def __init__(self, student_channels: int, teacher_channels: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
        self.size = size

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return pool_to(self.conv(pool_to(as_map(feat), self.size)), self.size)


class VectorProjector(torch.nn.Module):
    """Linear map of pooled embeddings (student width to teacher width, or to a contrastive space)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(d_in, d_out)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.linear(as_vector(feat))


class ProjectorBank(torch.nn.Module):
    """Every pair's projector behind one forward, called once per loss: under DDP a module's gradients
    synchronise through its own forward, and calling it once per step keeps that simple."""

    def __init__(self, projectors: Mapping[str, torch.nn.Module]) -> None:
        super().__init__()
        self.projectors = torch.nn.ModuleDict(projectors)

    def __len__(self) -> int:
        return len(self.projectors)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.projectors[k](v) if k in self.projectors else v for k, v in features.items()}
