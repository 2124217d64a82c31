"""Matching training trajectories, MTT (Cazenavette et al. 2022, "Dataset Distillation by Matching
Training Trajectories"), with FTD's flat experts and DATM's start-epoch window.

Why trajectories: gradient matching looks one step ahead; MTT asks a student trained for a few steps on
the synthetic set to land where an expert trained on real data landed a few *epochs* later (long-range
dynamics). The price is back-propagating through the unroll, hence three memory regimes in `unroll` and
`SavedTensorMeter` to measure what each keeps for backward.

BatchNorm: the student runs with running statistics mapped to None (`stateless_buffers`): batch
statistics, no state mutation, so the unroll is a pure function that checkpointing can recompute
exactly. Experts train in train mode (batch statistics too), so both see the same network.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

__all__ = [
    "SavedTensorMeter",
    "UnrollMode",
    "peak_unroll_memory",
    "saved_bytes_by_steps",
    "cross_entropy_any",
    "stateless_buffers",
    "trajectory_loss",
    "unroll",
]

Params = dict[str, Tensor]
UnrollMode = Literal["plain", "checkpoint", "truncate"]


def stateless_buffers(model: nn.Module) -> dict[str, Tensor | None]:
    """The model's buffers for `functional_call`, with norm layers' running statistics replaced by None.

    With None running stats BatchNorm uses batch statistics in train *and* eval mode and updates
    nothing, so repeated or recomputed forwards are side-effect free.
    """
    stats: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                stats.add(f"{prefix}.{name}" if prefix else name)
    return {k: (None if k in stats else b) for k, b in model.named_buffers()}


def cross_entropy_any(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy with hard class ids (int) or soft targets (float (N, C) probabilities)."""
    if y.is_floating_point():
        return -(y * F.log_softmax(logits, dim=1)).sum(1).mean()
    return F.cross_entropy(logits, y)


def _batch_indices(step: int, n: int, batch_size: int, base_seed: int) -> Tensor:
    """Step ``step``'s minibatch: consecutive slices of a stream of per-epoch permutations.

    Derived from (step, base_seed) alone, so a checkpointed step recomputes the same batch, and nothing
    but a Python int is kept between steps.
    """
    first = step * batch_size
    e0, e1 = first // n, (first + batch_size - 1) // n
    perms = [
        torch.randperm(n, generator=torch.Generator().manual_seed(base_seed + e)) for e in range(e0, e1 + 1)
    ]
    offset = first - e0 * n
    return torch.cat(perms)[offset : offset + batch_size]


def unroll(
    model: nn.Module,
    start: Mapping[str, Tensor],
    x_syn: Tensor,
    y_syn: Tensor,
    syn_lr: Tensor,
    steps: int,
    batch_size: int | None,
    generator: torch.Generator,
    mode: UnrollMode = "plain",
    window: int | None = None,
    augment: Callable[[Tensor, int], Tensor] | None = None,
    buffers: Mapping[str, Tensor | None] | None = None,
) -> Params:
    """Train ``model``'s architecture functionally from ``start`` for ``steps`` SGD steps on the synthetic
    set; the result is differentiable w.r.t. ``x_syn``, soft ``y_syn`` and ``syn_lr``.

    ``syn_lr`` is the *raw* learning rate (a 0-d tensor, as in MTT); to learn it in log space pass
    ``log_lr.exp()``. ``y_syn``: class ids, or (N, C) probabilities (soft labels). ``batch_size=None``
    uses the whole set each step. ``augment(x_batch, step)`` (e.g. per-step DSA draws) must be a
    deterministic function of its arguments so checkpoint recomputation sees the same images.

    Modes: "plain" keeps every step's double-backward graph (memory grows fast with steps); "checkpoint"
    runs each step under `torch.utils.checkpoint` (non-reentrant), keeping only the step inputs -- one
    parameter copy per step -- and recomputing the step in backward; the inner `autograd.grad` already
    triggers one recomputation during the forward, so expect ~2x plain's time. "truncate"
    back-propagates through the last ``window`` steps only (memory flat in ``steps``, biased gradients;
    ``window=steps`` is exactly "plain").
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    if mode not in ("plain", "checkpoint", "truncate"):
        raise ValueError(f"unknown unroll mode '{mode}' (known: plain, checkpoint, truncate)")
    if mode == "truncate":
        if window is None or window < 1:
            raise ValueError(f"mode 'truncate' needs window >= 1 (got {window})")
    elif window is not None:
        raise ValueError(f"window only applies to mode 'truncate' (mode is '{mode}')")
    if syn_lr.dim() != 0:
        raise ValueError(f"syn_lr must be a 0-d tensor (got shape {tuple(syn_lr.shape)})")
    n = len(x_syn)
    bs = n if batch_size is None else min(int(batch_size), n)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    base_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    state_buffers = stateless_buffers(model) if buffers is None else dict(buffers)
    names = list(start)

    def step(i: int, create_graph: bool, x: Tensor, y: Tensor, lr: Tensor, *ps: Tensor) -> tuple[Tensor, ...]:
        if bs < n:
            idx = _batch_indices(i, n, bs, base_seed).to(x.device)
            x, y = x[idx], y[idx]
        if augment is not None:
            x = augment(x, i)
        state = cast(Any, (dict(zip(names, ps, strict=True)), state_buffers))
        logits = functional_call(model, state, (x,))
        grads = torch.autograd.grad(
            cross_entropy_any(logits, y), ps, create_graph=create_graph, allow_unused=True
        )
        return tuple(p if g is None else p - lr * g for p, g in zip(ps, grads, strict=True))

    def leaves(ps: Sequence[Tensor]) -> tuple[Tensor, ...]:
        return tuple(p.detach().requires_grad_(True) for p in ps)

    ps = leaves([start[k] for k in names])
    first_graph_step = 0
    if mode == "truncate":
        assert window is not None
        first_graph_step = max(0, steps - window)
        xd, yd, lrd = x_syn.detach(), y_syn.detach(), syn_lr.detach()
        for i in range(first_graph_step):  # no graph kept: inner gradients only, results detached
            with torch.enable_grad():
                ps = leaves([p.detach() for p in step(i, False, xd, yd, lrd, *ps)])
    for i in range(first_graph_step, steps):
        if mode == "checkpoint":
            ps = tuple(checkpoint(step, i, True, x_syn, y_syn, syn_lr, *ps, use_reentrant=False))
        else:
            ps = step(i, True, x_syn, y_syn, syn_lr, *ps)
    return dict(zip(names, ps, strict=True))


def trajectory_loss(
    final: Mapping[str, Tensor], start: Mapping[str, Tensor], target: Mapping[str, Tensor]
) -> Tensor:
    """MTT's normalised parameter distance: sum ||final - target||^2 / sum ||start - target||^2.

    Normalising by how far the expert moved makes the loss comparable across start epochs and layers of
    different scale (early epochs move much more than late ones).
    """
    if set(final) != set(target) or set(start) != set(target):
        raise ValueError("final, start and target must hold the same parameter names")
    num = torch.stack([((final[k] - target[k].to(final[k])) ** 2).sum() for k in target]).sum()
    den = torch.stack([((start[k].detach() - target[k].to(start[k])) ** 2).sum() for k in target]).sum()
    return num / den.to(num).clamp_min(torch.finfo(num.dtype).tiny)  # tiny: an expert that did not move


class _Saved:
    """What the meter's pack hook hands autograd: a detached alias (no grad_fn, so no reference cycle)."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class SavedTensorMeter:
    """Bytes autograd holds for backward (saved tensors, once per storage) while the meter is active.

    Torch's CPU allocations are invisible to `tracemalloc` and RSS is noisy, but saved tensors are what
    grows with the unroll length. A storage counts from its first save until the last graph node saving
    it is freed; ``current`` is held now, ``peak`` the maximum. Checkpointed regions hold nothing here
    (checkpoint's own hooks take precedence), which is the point of checkpointing.
    """

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._live: dict[int, list[int]] = {}  # storage address -> [bytes, saves alive]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: Tensor) -> _Saved:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [storage.nbytes(), 1]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        box = _Saved(t.detach())
        weakref.finalize(box, self._release, key)
        return box

    def _release(self, key: int) -> None:
        entry = self._live[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._live[key]
            self.current -= entry[0]

    @staticmethod
    def _unpack(box: _Saved) -> Tensor:
        return box.tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def saved_bytes_by_steps(
    model_fn: Callable[[], nn.Module],
    steps_list: Sequence[int],
    mode: UnrollMode,
    window: int | None = None,
    in_shape: Sequence[int] = (1, 8, 8),
    classes: int = 10,
    ipc: int = 1,
    batch_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[int, int]:
    """Peak bytes saved for backward by `unroll` (its forward only) for each unroll length: the memory
    benchmark behind the choice of mode. Same model, data and batches for every length."""
    out: dict[int, int] = {}
    for steps in steps_list:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_fn().to(dtype)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(ipc * classes, *in_shape, generator=gen, dtype=dtype).requires_grad_(True)
        y = torch.arange(classes).repeat_interleave(ipc)
        lr = torch.tensor(0.01, dtype=dtype, requires_grad=True)
        start = {k: p.detach() for k, p in model.named_parameters()}
        with SavedTensorMeter() as meter:
            unroll(model, start, x, y, lr, steps, batch_size, gen, mode=mode, window=window)
        out[int(steps)] = meter.peak
    return out


def peak_unroll_memory(
    steps: int,
    mode: UnrollMode,
    window: int | None = None,
    model_fn: Callable[[], nn.Module] | None = None,
    ipc: int = 1,
) -> int:
    """Peak saved-for-backward bytes of one unroll of ``steps`` (default: the zoo CNN, width 4, on
    10-class 8x8 images, IPC 1, full-batch steps)."""
    if model_fn is None:
        from distill.classifier.models import build_model

        model_fn = lambda: build_model("cnn", [1, 8, 8], 10, {"width": 4})  # noqa: E731
    return saved_bytes_by_steps(model_fn, [steps], mode, window=window, ipc=ipc)[steps]
