"""The family's datasets: 2-D toys drawn by seed and sklearn's digits scaled to [-1, 1]. A toy ring also
carries its mode centres (mode coverage is measured against them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from distill.recipe_diffusion import DigitsDiffusionDataConfig, ToyDataConfig

RING_RADIUS, RING_STD = 1.5, 0.08


@dataclass
class DiffusionData:
    name: str
    x: torch.Tensor  # training rows (N, *shape)
    y: torch.Tensor  # (N,) class ids (zeros for unconditional data)
    x_test: torch.Tensor
    y_test: torch.Tensor
    shape: tuple[int, ...]
    classes: int  # 0: unconditional
    modes: torch.Tensor | None = None  # (K, 2) centres of a mixture toy
    mode_radius: float = 0.0

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "shape": list(self.shape), "classes": self.classes,
                "train_rows": len(self.x), "test_rows": len(self.x_test)}  # fmt: skip


def ring_centres(k: int = 8, radius: float = RING_RADIUS) -> torch.Tensor:
    angles = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    return (radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)).float()


def _toy(shape: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if shape == "ring8":
        centres = ring_centres().numpy()
        return centres[rng.integers(0, 8, n)] + RING_STD * rng.standard_normal((n, 2))
    from sklearn.datasets import make_moons, make_swiss_roll

    if shape == "moons":
        pts, _ = make_moons(n, noise=0.05, random_state=seed)
        return (pts - np.array([0.5, 0.25])) / np.array([0.87, 0.5])
    roll, _ = make_swiss_roll(n, noise=0.3, random_state=seed)
    return roll[:, [0, 2]] / 7.0


def load_toy(cfg: ToyDataConfig, seed: int) -> DiffusionData:
    train = torch.tensor(_toy(cfg.shape, cfg.train_size, seed), dtype=torch.float32)
    test = torch.tensor(_toy(cfg.shape, cfg.test_size, seed + 7919), dtype=torch.float32)
    ring = cfg.shape == "ring8"
    return DiffusionData(
        name=cfg.shape, x=train, y=torch.zeros(len(train), dtype=torch.long), x_test=test,
        y_test=torch.zeros(len(test), dtype=torch.long), shape=(2,), classes=0,
        modes=ring_centres() if ring else None, mode_radius=4 * RING_STD if ring else 0.0,
    )  # fmt: skip


def load_digits_images(cfg: DigitsDiffusionDataConfig, seed: int) -> DiffusionData:
    """A stratified split fixed by `seed`; pixels 0..16 mapped to [-1, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    if cfg.size == 16:
        x = torch.nn.functional.interpolate(x, size=16, mode="bilinear", align_corners=False)
    tr, te = train_test_split(
        np.arange(len(y)), test_size=cfg.test_fraction, random_state=seed, stratify=d.target
    )
    tr_i, te_i = torch.tensor(tr), torch.tensor(te)
    return DiffusionData(
        name=f"digits{cfg.size}", x=x[tr_i], y=y[tr_i], x_test=x[te_i], y_test=y[te_i],
        shape=(1, cfg.size, cfg.size), classes=10,
    )  # fmt: skip


def load_data(cfg: ToyDataConfig | DigitsDiffusionDataConfig, seed: int) -> DiffusionData:
    if isinstance(cfg, ToyDataConfig):
        return load_toy(cfg, seed)
    return load_digits_images(cfg, seed)
