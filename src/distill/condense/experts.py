"""MTT's experts (Cazenavette et al. 2022): networks trained on the real data whose parameters are kept
after every epoch, stored one safetensors file per expert; FTD's flat experts (a gradient-norm penalty)
and DATM's difficulty-aligned start window are options of training and sampling."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from distill.condense.trajectory import Params, cross_entropy_any

_KEY = re.compile(r"^epoch(\d+)\.(.+)$")

__all__ = ["ExpertBuffer", "train_expert", "train_experts"]


def train_expert(
    model_fn: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    flat_penalty: float = 0.0,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
) -> list[Params]:
    """Train a fresh ``model_fn()`` with plain SGD on real data; return its parameters at the start and
    after every epoch (``epochs + 1`` dicts, detached clones) -- MTT's expert trajectory.

    ``seed`` fixes the initialisation, batch order, augmentation draws and dropout without touching the
    global RNG. ``flat_penalty`` > 0 adds rho * ||grad L|| to the loss (a gradient-norm penalty, the
    first-order expansion of SAM's L(w + rho g/||g||)): FTD (Du et al. 2023) shows flatter experts
    leave less accumulated trajectory error for the student to inherit.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1 (got {epochs}, {batch_size})")
    if flat_penalty < 0:
        raise ValueError(f"flat_penalty must be >= 0 (got {flat_penalty})")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_fn().to(x.device)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

        def snapshot() -> Params:
            return {k: p.detach().clone() for k, p in model.named_parameters()}

        trajectory = [snapshot()]
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen).to(x.device)
            for chunk in order.split(batch_size):
                xb, yb = x[chunk], y[chunk]
                if augment is not None:
                    xb = augment(xb, gen)
                loss = cross_entropy_any(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                if flat_penalty > 0:
                    grads = torch.autograd.grad(loss, params, create_graph=True)
                    sq = torch.stack([(g * g).sum() for g in grads]).sum()
                    loss = loss + flat_penalty * torch.sqrt(sq + 1e-12)  # eps: sqrt' is infinite at 0
                loss.backward()
                opt.step()
            trajectory.append(snapshot())
    return trajectory


class ExpertBuffer:
    """Expert trajectories on disk, one safetensors file per expert with keys ``epoch{e}.{param}``.

    `sample` draws a random expert and a start epoch uniformly from ``min_start_epoch..max_start_epoch``
    and returns (params at start, params ``expert_epochs`` later). Moving the window (DATM, Guo et al.
    2024, "Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching") matches
    early, easy dynamics for small IPC and later, harder ones for large IPC. Only the two needed epochs
    are read from disk.
    """

    def __init__(
        self,
        folder: str | Path,
        expert_epochs: int,
        max_start_epoch: int,
        min_start_epoch: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if expert_epochs < 1 or not 0 <= min_start_epoch <= max_start_epoch:
            got = (expert_epochs, min_start_epoch, max_start_epoch)
            raise ValueError(f"need expert_epochs >= 1, 0 <= min_start_epoch <= max_start_epoch (got {got})")
        self.folder = Path(folder)
        self.expert_epochs = expert_epochs
        self.min_start_epoch = min_start_epoch
        self.max_start_epoch = max_start_epoch
        self.device = torch.device(device)

    @property
    def paths(self) -> list[Path]:
        return sorted(self.folder.glob("expert_*.safetensors"))

    def __len__(self) -> int:
        return len(self.paths)

    def add(self, trajectory: Sequence[Mapping[str, Tensor]]) -> Path:
        """Write one trajectory (list of param dicts, epoch 0 first) as the next ``expert_NNNN`` file."""
        if len(trajectory) < 2:
            raise ValueError("a trajectory needs at least a start and one epoch")
        self.folder.mkdir(parents=True, exist_ok=True)
        taken = {int(p.stem.split("_")[1]) for p in self.paths}
        index = next(i for i in range(len(taken) + 1) if i not in taken)
        tensors = {
            f"epoch{e}.{k}": v.detach().to("cpu").contiguous().clone()
            for e, params in enumerate(trajectory)
            for k, v in params.items()
        }
        path = self.folder / f"expert_{index:04d}.safetensors"
        save_file(tensors, str(path), metadata={"epochs": str(len(trajectory) - 1)})
        return path

    def epochs(self, index: int) -> int:
        """Training epochs recorded by expert ``index`` (its trajectory has that many + 1 points)."""
        with safe_open(str(self.paths[index]), framework="pt") as f:
            return int((f.metadata() or {})["epochs"])

    def load_epoch(self, index: int, epoch: int) -> Params:
        with safe_open(str(self.paths[index]), framework="pt", device=str(self.device)) as f:
            out = {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                m = _KEY.match(key)
                if m and int(m.group(1)) == epoch:
                    out[m.group(2)] = f.get_tensor(key)
        if not out:
            raise ValueError(f"expert {index} has no epoch {epoch} (it has {self.epochs(index)} epochs)")
        return out

    def load(self, index: int) -> list[Params]:
        return [self.load_epoch(index, e) for e in range(self.epochs(index) + 1)]

    def sample(
        self,
        generator: torch.Generator,
        min_start_epoch: int | None = None,
        max_start_epoch: int | None = None,
    ) -> tuple[Params, Params]:
        """(start params, target params) from a random expert; the window can be overridden per call."""
        lo = self.min_start_epoch if min_start_epoch is None else min_start_epoch
        hi = self.max_start_epoch if max_start_epoch is None else max_start_epoch
        paths = self.paths
        if not paths:
            raise ValueError(f"no experts in {self.folder}")
        if not 0 <= lo <= hi:
            raise ValueError(f"need 0 <= min_start_epoch <= max_start_epoch (got {lo}, {hi})")
        index = int(torch.randint(len(paths), (1,), generator=generator))
        start = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        total = self.epochs(index)
        if hi + self.expert_epochs > total:
            raise ValueError(
                f"max_start_epoch {hi} + expert_epochs {self.expert_epochs} exceeds the {total} epochs "
                f"of {paths[index].name}"
            )
        return self.load_epoch(index, start), self.load_epoch(index, start + self.expert_epochs)


def train_experts(
    buffer: ExpertBuffer,
    count: int,
    model_fn: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    flat_penalty: float = 0.0,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
) -> list[Path]:
    """Train ``count`` experts (seeds ``seed``, ``seed + 1``, ...) into ``buffer``; ``flat_penalty`` > 0
    builds FTD's flat experts."""
    return [
        buffer.add(
            train_expert(model_fn, x, y, epochs, lr, batch_size, seed + i, flat_penalty, augment=augment)
        )
        for i in range(count)
    ]
