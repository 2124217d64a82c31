"""The fixed digits classifier every digits sample is judged by: its penultimate features give the
FID-like score and precision / recall, its predictions the per-class accuracy of conditional samples.
Trained once per (data, seed) on the training split and stored by fingerprint, so every run of that
data is scored by the same network."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distill.diffusion.data import DiffusionData
from distill.io import write_json_atomic


class DigitsJudge(nn.Module):
    def __init__(self, channels: int = 1, classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * width, 64), nn.GELU(),
        )  # fmt: skip
        self.head = nn.Linear(64, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


def _fingerprint(data: DiffusionData, steps: int, seed: int) -> str:
    what = {
        "data": data.describe(),
        "checksum": float(data.x.double().sum()),
        "steps": steps,
        "seed": seed,
        "v": 1,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def train_judge(data: DiffusionData, steps: int, seed: int, store: Path) -> tuple[DigitsJudge, float]:
    """The judge and its test accuracy; reused from `store` when this data and seed trained one before."""
    folder = store / f"judge-{_fingerprint(data, steps, seed)}"
    model = DigitsJudge(data.shape[0], data.classes)
    if (folder / "info.json").exists():
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval(), float(json.loads((folder / "info.json").read_text())["test_accuracy"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(0, len(data.x), (128,), generator=gen)
            x = data.x[idx] + 0.05 * torch.randn(data.x[idx].shape, generator=gen)  # robust to sample noise
            loss = nn.functional.cross_entropy(model(x), data.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(-1) == data.y_test).float().mean())
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    write_json_atomic(folder / "info.json", {"test_accuracy": acc})
    return model, acc
