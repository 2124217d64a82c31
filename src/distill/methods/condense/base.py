"""What every dataset-distillation method shares. The synthetic set is the trainable module (images;
optionally soft labels and a learned step size, each with its own learning rate through the engine's
`lr_scale`); batches are real rows drawn per class; the loss is a matching loss summed over classes;
export writes the set as safetensors and as Parquet that `datasets` loads."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill.io import atomic_folder
from distill.methods.base import Method, Phase


class SyntheticImages(torch.nn.Module):
    """The distilled images, (classes * ipc, *in_shape), ordered class by class."""

    def __init__(self, images: torch.Tensor, lr_scale: float) -> None:
        super().__init__()
        self.images = torch.nn.Parameter(images.clone())
        self.lr_scale = lr_scale

    def forward(self) -> torch.Tensor:
        return self.images


class SoftLabels(torch.nn.Module):
    """Learned label logits per synthetic image (MTT with learned soft labels)."""

    def __init__(self, logits: torch.Tensor, lr_scale: float) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())
        self.lr_scale = lr_scale

    def forward(self) -> torch.Tensor:
        return self.logits


class LearnedStep(torch.nn.Module):
    """MTT's learned synthetic learning rate, kept positive through its logarithm."""

    def __init__(self, lr: float, lr_scale: float) -> None:
        super().__init__()
        self.log_lr = torch.nn.Parameter(torch.tensor(float(lr)).log())
        self.lr_scale = lr_scale

    def forward(self) -> torch.Tensor:
        return self.log_lr.exp()


@dataclass
class RealBatch:
    """`per_class` real rows of every class, class by class."""

    x: torch.Tensor
    y: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device) -> RealBatch:
        return RealBatch(self.x.to(device), self.y.to(device), self.extra)

    def stats(self) -> dict[str, float]:
        return {"real_rows": float(len(self.y))}


class ClassStream:
    """Endless stream of class-balanced real batches: step `i` draws `per_class` rows of every class with
    a generator seeded by (seed, rank, i), so the position is just `i` and resuming is exact."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: int, per_class: int, seed: int) -> None:
        self.x, self.y, self.seed = x, y, seed
        self.by_class = [torch.nonzero(y == c).flatten() for c in range(classes)]
        self.per_class = per_class
        self.rank, self.index = 0, 0

    def shard(self, rank: int, world: int) -> None:
        self.rank = rank

    def next_batch(self) -> RealBatch:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + self.index)
        self.index += 1
        rows = []
        for members in self.by_class:
            take = min(self.per_class, len(members))
            rows.append(members[torch.randperm(len(members), generator=gen)[:take]])
        idx = torch.cat(rows)
        return RealBatch(self.x[idx], self.y[idx])

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


@dataclass
class CondenseContext:
    """What the family hands each method: the budget, the initial set, the real data, how to build the
    matching network, and the settings of the synthetic set."""

    classes: int
    ipc: int
    in_shape: list[int]
    init_images: torch.Tensor  # (classes * ipc, *in_shape)
    labels: torch.Tensor  # (classes * ipc,) hard labels, class by class
    make_network: Any  # (seed) -> nn.Module: the matching network, freshly initialised
    image_lr_scale: float = 1.0
    label_lr_scale: float = 1.0
    lr_lr_scale: float = 1.0
    teacher: torch.nn.Module | None = None
    dsa_strategy: str | None = None


class CondenseMethod(Method):
    """Base of the dataset-distillation methods. Learned methods train `images`; selections pick rows
    when built and train nothing."""

    def __init__(self, ctx: CondenseContext, cfg: Any) -> None:
        self.ctx, self.cfg = ctx, cfg
        self.images = SyntheticImages(ctx.init_images, ctx.image_lr_scale)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"images": self.images}

    def loss_units(self, batch: RealBatch, phase: Phase) -> float:
        return float(self.ctx.classes)  # one matching term per class

    def synthetic(self) -> dict[str, torch.Tensor]:
        """The set as it stands: images, hard labels, and where learned, soft labels and the step size."""
        return {"images": self.images.images.detach().cpu().clone(), "labels": self.ctx.labels.clone()}

    def export(self, folder: Path) -> None:
        """synthetic.safetensors (every tensor) and synthetic.parquet (one row per example: the image
        as a nested list, its label, its soft label): `datasets.load_dataset("parquet", ...)` reads it."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        from safetensors.torch import save_file

        data = self.synthetic()
        with atomic_folder(folder) as tmp:
            save_file({k: v.contiguous() for k, v in data.items()}, str(tmp / "synthetic.safetensors"))
            rows: dict[str, list[Any]] = {"image": data["images"].tolist(), "label": data["labels"].tolist()}
            if "soft_labels" in data:
                rows["soft_label"] = data["soft_labels"].tolist()
            pq.write_table(pa.table(rows), str(tmp / "synthetic.parquet"))
            meta = {
                "ipc": self.ctx.ipc,
                "classes": self.ctx.classes,
                "in_shape": self.ctx.in_shape,
                "method": self.name,
            }
            if "lr" in data:
                meta["lr"] = float(data["lr"])
            (tmp / "synthetic.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


class SelectionMethod(CondenseMethod):
    """A subset of real rows (random, herding, DQ): chosen when built, nothing to train."""

    def __init__(
        self, ctx: CondenseContext, cfg: Any, x: torch.Tensor, chosen: torch.Tensor, y: torch.Tensor
    ) -> None:
        super().__init__(ctx, cfg)
        order = torch.argsort(y[chosen], stable=True)  # class by class, as the synthetic sets are
        self.chosen = chosen[order]
        self.images = SyntheticImages(x[self.chosen], 1.0)
        self.ctx.labels = y[self.chosen].clone()

    def modules(self) -> dict[str, torch.nn.Module]:
        return {}

    def loss(self, ctx: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        raise AssertionError("a selection trains nothing")
