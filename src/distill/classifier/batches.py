"""Batches of the classifier family and the resumable, sharded stream that makes them.

A batch carries row indices next to inputs and labels: a graph teacher's logits are looked up by node,
and unlabelled rows (label -1) still get the teacher's soft labels in label-free KD.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from distill.data.batching import shard_rows

UNLABELLED = -1


@dataclass
class ClassifierBatch:
    x: torch.Tensor
    y: torch.Tensor  # (B,) class ids, UNLABELLED where the label is withheld
    index: torch.Tensor  # (B,) row ids in the family's tensors
    targets: torch.Tensor | None = None  # (B, C) mixed hard targets after mixup / cutmix
    teacher_logits: torch.Tensor | None = None  # filled by the method's preparation
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device) -> ClassifierBatch:
        moved = {k: v.to(device) for k, v in self.extra.items()}
        opt = [t.to(device) if t is not None else None for t in (self.targets, self.teacher_logits)]
        return ClassifierBatch(
            self.x.to(device), self.y.to(device), self.index.to(device), opt[0], opt[1], moved
        )

    @property
    def labelled(self) -> torch.Tensor:
        return self.y != UNLABELLED

    def stats(self) -> dict[str, float]:
        return {"samples": float(self.y.shape[0]), "labelled": float(self.labelled.sum())}


class TensorStream:
    """Endless stream over a fixed set of rows, reshuffled each epoch by (seed, epoch); its state is
    (epoch, index). The plan is made for the global batch and each process takes its contiguous share,
    so N processes see what one process would with N times the batch."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, batch_size: int, seed: int
    ) -> None:
        self.x, self.y, self.rows = x, y, rows.tolist()
        self.batch_size, self.seed = min(batch_size, len(self.rows)), seed
        self.rank, self.world, self.epoch, self.index = 0, 1, 0, 0
        self._cached: tuple[tuple[int, int], list[list[int]]] | None = None

    def shard(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def _plan(self) -> list[list[int]]:
        """This epoch's global batches; made once per epoch (a reshuffle per batch would cost more than
        a small model's step)."""
        key = (self.epoch, self.world)
        if self._cached is None or self._cached[0] != key:
            order = list(self.rows)
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            size = min(self.batch_size * self.world, len(order))
            self._cached = (key, [order[i : i + size] for i in range(0, len(order) - size + 1, size)])
        return self._cached[1]

    def next_batch(self) -> ClassifierBatch:
        plan = self._plan()
        if self.index >= len(plan):
            self.epoch, self.index = self.epoch + 1, 0
            plan = self._plan()
        share = shard_rows([[i] for i in plan[self.index]], self.rank, self.world)
        self.index += 1
        idx = torch.tensor([r[0] for r in share], dtype=torch.long)
        return ClassifierBatch(self.x[idx], self.y[idx], idx)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
