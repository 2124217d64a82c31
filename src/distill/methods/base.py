"""The method interface every family implements, and the batch / stream protocols the engine consumes.

A method owns its trainable modules (student, projectors, drafter, critic, synthetic data) and the frozen
ones it reads (a teacher); declares named optimizer groups and the phases that step them; prepares each
batch without gradients (sampling, teacher scoring, noising) before the loss; counts its loss units
after that preparation; and returns named losses. The engine owns everything else (devices, precision,
accumulation, clipping, schedules, checkpoints) and imports no model library.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from distill.registry import Registry

B = TypeVar("B", bound="Batch")


class Batch(Protocol):
    """Whatever a family batches (token ids, images, graphs, noise levels)."""

    def to(self: B, device: torch.device) -> B: ...

    def stats(self) -> dict[str, float]:
        """Numbers the engine sums over a step's micro-batches and logs (real tokens, samples)."""
        ...


class Stream(Protocol):
    """An endless, resumable source of batches, sharded by process: across ranks every example is seen
    once per epoch, in an order that is a pure function of the seed; `state_dict` is the position."""

    def shard(self, rank: int, world: int) -> None: ...

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Phase:
    """`updates` optimizer updates of `group` in a row; a training step runs every phase in order."""

    group: str = "main"
    updates: int = 1


@dataclass
class StepContext:
    """What the engine hands a method's loss. `modules` are the trainable modules as the engine prepared
    them (wrapped for DDP where distributed): call *these* for forward passes so gradients synchronise."""

    modules: dict[str, torch.nn.Module]
    normalizer: float  # loss units in the whole accumulated, all-process update, divided by world size
    phase: Phase
    step: int
    device: torch.device


class Method(ABC):
    """A distillation method: modules, groups, phases, preparation, loss, after-step hook, state, export."""

    name: str = "abstract"

    @abstractmethod
    def modules(self) -> dict[str, torch.nn.Module]:
        """Trainable modules by name; checkpointed and prepared by the engine. The same objects every call."""

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """Modules the method reads but never trains (a teacher): moved to the device, not checkpointed."""
        return {}

    def groups(self) -> dict[str, list[str]]:
        """Optimizer group -> names of the modules it steps. Default: one group, every module."""
        return {"main": list(self.modules())}

    def phases(self) -> list[Phase]:
        return [Phase(next(iter(self.groups())))]

    def prepare(self, batch: Any, phase: Phase) -> Any:
        """Run without gradients before the loss (sampling, teacher scoring, noising). Default: as is."""
        return batch

    @abstractmethod
    def loss_units(self, batch: Any, phase: Phase) -> float:
        """What the loss is normalised by, counted after `prepare` (tokens, generated tokens, samples)."""

    @abstractmethod
    def loss(self, ctx: StepContext, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to back-propagate, already a sum divided by `ctx.normalizer`, and named parts to log."""

    def after_step(self, phase: Phase, step: int) -> None:  # noqa: B027 - optional hook
        """After each optimizer update of `phase` (EMA teachers, target syncs)."""

    def state_dict(self) -> dict[str, Any]:
        """Extra state to checkpoint (tensors, numbers, lists, dicts; no objects)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        pass

    def check_distributed(self, distributed_type: str, zero_stage: int | None) -> None:  # noqa: B027
        """Raise a DistillError when the method cannot run under this kind of distribution."""

    def export(self, folder: Path) -> None:  # noqa: B027 - optional hook
        """Write what users keep (a from_pretrained folder); extra modules (projectors, critics) stay out."""


METHODS: Registry[type[Method]] = Registry("method")
