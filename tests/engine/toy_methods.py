"""Methods of no family the project ships, written against the engine's interface only (no transformers):
a classifier KD on image-shaped batches, a two-group / two-phase adversarial method with k critic
updates per generator update, and an EMA teacher updated in the after-step hook."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from distill.data.batching import shard_rows
from distill.methods.base import Method, Phase, StepContext

CLASSES = 4


@dataclass
class ImageBatch:
    x: torch.Tensor  # (B, 1, 8, 8)
    y: torch.Tensor  # (B,)

    def to(self, device: torch.device) -> ImageBatch:
        return ImageBatch(self.x.to(device), self.y.to(device))

    def stats(self) -> dict[str, float]:
        return {"samples": float(self.y.shape[0])}


def toy_images(
    n: int = 96, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c lights up quadrant c of an 8x8 image, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, 0, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] += 1.0
    return x, y


class ImageStream:
    """Sharded, resumable stream over a fixed tensor dataset (the engine's Stream protocol)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.rank, self.world, self.epoch, self.index = 0, 1, 0, 0
        self.seen: list[int] = []

    def shard(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def _plan(self) -> list[list[int]]:
        order = list(range(len(self.y)))
        random.Random(self.seed * 1000 + self.epoch).shuffle(order)
        size = self.batch_size * self.world
        return [order[i : i + size] for i in range(0, len(order) - size + 1, size)]

    def next_batch(self) -> ImageBatch:
        plan = self._plan()
        if self.index >= len(plan):
            self.epoch, self.index = self.epoch + 1, 0
            plan = self._plan()
        rows = shard_rows([[i] for i in plan[self.index]], self.rank, self.world)
        self.index += 1
        idx = [r[0] for r in rows]
        self.seen.extend(idx)
        return ImageBatch(self.x[idx], self.y[idx])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def small_cnn(seed: int, width: int = 4, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(4 * width, CLASSES),
    ).to(dtype)  # fmt: skip


class ClassifierKD(Method):
    """Hinton KD on a plain nn.Module: T^2 KL to a frozen teacher plus cross-entropy, per sample."""

    name = "toy_classifier_kd"

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, temperature: float = 2.0) -> None:
        self.student, self.teacher, self.t = student, teacher.eval().requires_grad_(False), temperature

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"student": self.student}

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"teacher": self.teacher}

    def loss_units(self, batch: ImageBatch, phase: Phase) -> float:
        return float(batch.y.shape[0])

    def loss(self, ctx: StepContext, batch: ImageBatch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = ctx.modules["student"](batch.x)
        with torch.no_grad():
            soft = F.log_softmax(self.teacher(batch.x) / self.t, -1)
        kd = F.kl_div(F.log_softmax(logits / self.t, -1), soft, log_target=True, reduction="sum") * self.t**2
        ce = F.cross_entropy(logits, batch.y, reduction="sum")
        return (kd + ce) / ctx.normalizer, {
            "kd": float(kd.detach()) / ctx.normalizer,
            "ce": float(ce.detach()) / ctx.normalizer,
        }


class EMAClassifierKD(ClassifierKD):
    """Adds an exponential moving average of the student (a self-distillation teacher) after each step."""

    name = "toy_ema"

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, decay: float = 0.9) -> None:
        super().__init__(student, teacher)
        self.decay = decay
        self.ema = copy.deepcopy(student).requires_grad_(False)

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"teacher": self.teacher, "ema": self.ema}

    def after_step(self, phase: Phase, step: int) -> None:
        with torch.no_grad():
            for e, s in zip(self.ema.parameters(), self.student.parameters(), strict=True):
                e.mul_(self.decay).add_(s.detach(), alpha=1 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": {k: v.detach().cpu().clone() for k, v in self.ema.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])


@dataclass
class NoisyBatch:
    real: ImageBatch
    noise: torch.Tensor

    def stats(self) -> dict[str, float]:
        return self.real.stats()


class TwoPhaseAdversarial(Method):
    """A generator maps noise to images, a critic tells them from real ones (least-squares GAN): k
    critic updates, then one generator update, each with its own optimizer group. Noise is drawn in
    `prepare`, so resuming exactly needs the RNG state too."""

    name = "toy_two_phase"

    def __init__(self, critic_updates: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
        torch.manual_seed(seed)
        self.generator = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 64)
        ).to(dtype)
        self.critic = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        ).to(dtype)
        self.k = critic_updates

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"generator": self.generator, "critic": self.critic}

    def groups(self) -> dict[str, list[str]]:
        return {"critic": ["critic"], "generator": ["generator"]}

    def phases(self) -> list[Phase]:
        return [Phase("critic", self.k), Phase("generator", 1)]

    def prepare(self, batch: ImageBatch, phase: Phase) -> NoisyBatch:
        return NoisyBatch(batch, torch.randn(batch.x.shape[0], 8, dtype=batch.x.dtype, device=batch.x.device))

    def loss_units(self, batch: NoisyBatch, phase: Phase) -> float:
        return float(batch.noise.shape[0])

    def loss(self, ctx: StepContext, batch: NoisyBatch) -> tuple[torch.Tensor, dict[str, float]]:
        real, noise = batch.real, batch.noise
        gen, critic = ctx.modules["generator"], ctx.modules["critic"]
        if ctx.phase.group == "critic":
            with torch.no_grad():
                fake = gen(noise).view_as(real.x)
            value = ((critic(real.x) - 1) ** 2).sum() + (critic(fake) ** 2).sum()
        else:
            value = ((critic(gen(noise).view_as(real.x)) - 1) ** 2).sum()
        return value / ctx.normalizer, {}
