"""How a distilled (or selected) set is scored: train fresh networks on it alone, test each once.

The protocol follows the dataset-distillation convention (DC, DSA, DM, MTT: a randomly initialised
network trained on the small set for a fixed number of epochs, step decay of the learning rate x0.1 at
half-way, accuracy over several seeds), with the leaks that make published numbers untrustworthy closed:

* the test split is scored exactly once per trained network, after training; it never picks an epoch,
  a learning rate or anything else (several reference evaluators report the best test accuracy seen
  during training, which is an optimistic, test-selected number);
* epoch selection, when wanted (`select="best"`), uses a validation split carved from the real training
  data (`distill.classifier.data.split_validation`), default "last" uses no selection at all;
* each seed fixes the initialisation, the batch order and the augmentation draws, without touching
  the global RNG; the mean comes with a Student-t interval (`distill.stats.mean_interval`).

DD-Ranking's metrics, which read these numbers against a random subset, are in `dd_ranking.py`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.classifier.models import build_model
from distill.methods.classifier.base import accuracy  # the one accuracy of the project
from distill.stats import mean_interval

__all__ = ["accuracy", "cross_architecture", "evaluate_set", "train_fresh"]

# (x, target probabilities, generator) -> (x, targets); `distill.classifier.augment.Augment` fits.
AugmentFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
_OPTIMIZERS = ("adam", "sgd")
_SELECT = ("last", "best")


@dataclass
class _Fit:
    model: nn.Module
    epoch: int  # the epoch whose weights are returned (1-based)
    val_acc: float | None  # validation accuracy of the returned weights, if a validation split was given


def _targets(y_syn: torch.Tensor, soft: torch.Tensor | None, classes: int) -> torch.Tensor:
    """Training targets as probability rows: one-hot for hard labels, `soft` as given otherwise."""
    if y_syn.ndim != 1:
        raise ValueError(f"y_syn must be 1-D class ids (got shape {tuple(y_syn.shape)})")
    if len(y_syn) and (int(y_syn.min()) < 0 or int(y_syn.max()) >= classes):
        raise ValueError(f"y_syn must hold class ids in [0, {classes})")
    if soft is None:
        return F.one_hot(y_syn.long().cpu(), classes).float()
    if soft.shape != (len(y_syn), classes):
        raise ValueError(f"soft labels must be ({len(y_syn)}, {classes}) (got {tuple(soft.shape)})")
    soft = soft.detach().cpu().float()
    if bool((soft < 0).any()) or not torch.allclose(soft.sum(1), torch.ones(len(soft)), atol=1e-3):
        raise ValueError("soft labels must be probabilities (rows >= 0 summing to 1); softmax logits first")
    return soft


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-sum p log q: equals KL(p || q) plus the targets' entropy, a constant, so both give the same
    gradients; with one-hot targets it is the ordinary cross-entropy."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A shuffled epoch; a trailing batch of one joins the previous one (BatchNorm cannot train on 1)."""
    parts = list(torch.randperm(n, generator=gen).split(batch_size))
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2:] = [torch.cat(parts[-2:])]
    return parts


def _fit(
    arch: str,
    options: Mapping[str, Any] | None,
    in_shape: Sequence[int],
    classes: int,
    x_syn: torch.Tensor,
    y_syn: torch.Tensor,
    *,
    soft: torch.Tensor | None,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    x_val: torch.Tensor | None,
    y_val: torch.Tensor | None,
    augment: AugmentFn | None,
    select: str,
    optimizer: str,
    weight_decay: float,
    device: str | torch.device | None,
) -> _Fit:
    if len(x_syn) == 0 or len(x_syn) != len(y_syn):
        raise ValueError(f"x_syn ({len(x_syn)} rows) must be non-empty and match y_syn ({len(y_syn)})")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0 (got {epochs}, {batch_size}, {lr})")
    if select not in _SELECT:
        raise ValueError(f"select must be one of {', '.join(_SELECT)} (got '{select}')")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(_OPTIMIZERS)} (got '{optimizer}')")
    if (x_val is None) != (y_val is None):
        raise ValueError("give both x_val and y_val, or neither")
    if select == "best" and x_val is None:
        raise ValueError('select="best" needs x_val and y_val (a split of the real training data)')
    dev = torch.device(device) if device is not None else torch.device("cpu")
    targets = _targets(y_syn, soft, classes).to(dev)
    x = x_syn.detach().to(dev).float()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(int(seed))  # initialisation and dropout; the caller's RNG state is restored
        model = build_model(arch, in_shape, classes, options).to(dev)
        if optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(
                model.parameters(), lr=lr, weight_decay=weight_decay
            )
        else:
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(1, epochs // 2)], gamma=0.1)
        gen = torch.Generator().manual_seed(int(seed))  # batch order and augmentation draws
        best: tuple[float, int, dict[str, torch.Tensor] | None] = (-1.0, epochs, None)
        for epoch in range(1, epochs + 1):
            model.train()
            for idx in _batches(len(x), batch_size, gen):
                xb, tb = x[idx.to(dev)], targets[idx.to(dev)]
                if augment is not None:
                    xb, tb = augment(xb, tb, gen)
                loss = _soft_cross_entropy(model(xb), tb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
            if select == "best":
                assert x_val is not None and y_val is not None
                acc = accuracy(model, x_val, y_val)
                if acc > best[0]:  # ties keep the earlier epoch
                    best = (acc, epoch, copy.deepcopy(model.state_dict()))
    if select == "best" and best[2] is not None:
        model.load_state_dict(best[2])
        model.eval()
        return _Fit(model, best[1], best[0])
    model.eval()
    val_acc = accuracy(model, x_val, y_val) if x_val is not None and y_val is not None else None
    return _Fit(model, epochs, val_acc)


def train_fresh(
    arch: str,
    options: Mapping[str, Any] | None,
    in_shape: Sequence[int],
    classes: int,
    x_syn: torch.Tensor,
    y_syn: torch.Tensor,
    *,
    soft: torch.Tensor | None = None,
    epochs: int,
    lr: float,
    batch_size: int = 256,
    seed: int = 0,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    augment: AugmentFn | None = None,
    select: str = "last",
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    device: str | torch.device | None = None,
) -> nn.Module:
    """A network built by `build_model(arch, in_shape, classes, options)` from seed `seed`, trained on
    (x_syn, y_syn) only, returned in eval mode.

    Hard labels train with cross-entropy; `soft` (N, classes) probabilities (e.g. a teacher's softmax)
    train with soft cross-entropy, which has KL's gradients. Training runs a fixed `epochs` with the lr
    divided by 10 at half-way. Adam is the default: it is less sensitive to the lr across architectures,
    so one lr can serve a whole cross-architecture table without tuning it on held-out data; "sgd"
    (momentum 0.9, typical lr 0.01, weight_decay 5e-4) reproduces the DC/DM evaluation. `select="best"`
    returns the epoch with the highest accuracy on (x_val, y_val), which must come from the real training
    data, never the test split; "last" returns the final weights. `augment(x, targets, gen)` runs on each
    batch (e.g. `distill.classifier.augment.Augment`), drawing from the seeded generator."""
    return _fit(
        arch, options, in_shape, classes, x_syn, y_syn, soft=soft, epochs=epochs, lr=lr,
        batch_size=batch_size, seed=seed, x_val=x_val, y_val=y_val, augment=augment, select=select,
        optimizer=optimizer, weight_decay=weight_decay, device=device,
    ).model  # fmt: skip


def evaluate_set(
    arch: str,
    options: Mapping[str, Any] | None,
    in_shape: Sequence[int],
    classes: int,
    x_syn: torch.Tensor,
    y_syn: torch.Tensor,
    *,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    soft: torch.Tensor | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    epochs: int = 300,
    lr: float = 1e-3,
    batch_size: int = 256,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    augment: AugmentFn | None = None,
    select: str = "last",
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    level: float = 0.95,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train one fresh network per seed with `train_fresh` and score each once on the test split.

    Returns {"arch", "label" ("hard"/"soft"), "select", "seeds", "acc" (test accuracy per seed,
    fractions), "mean", "low", "high" (Student-t interval at `level`), "level", "epoch" (the epoch
    returned per seed), "val_acc" (per seed, None without a validation split), "n_syn"}. Five seeds by
    default: fewer give intervals too wide to separate methods a point apart."""
    if len(seeds) < 1:
        raise ValueError("evaluate_set needs at least one seed")
    accs: list[float] = []
    epochs_used: list[int] = []
    vals: list[float | None] = []
    for seed in seeds:
        fit = _fit(
            arch, options, in_shape, classes, x_syn, y_syn, soft=soft, epochs=epochs, lr=lr,
            batch_size=batch_size, seed=int(seed), x_val=x_val, y_val=y_val, augment=augment,
            select=select, optimizer=optimizer, weight_decay=weight_decay, device=device,
        )  # fmt: skip
        accs.append(accuracy(fit.model, x_test, y_test))  # the only look at the test split
        epochs_used.append(fit.epoch)
        vals.append(fit.val_acc)
    mean, low, high = mean_interval(accs, level)
    return {
        "arch": arch,
        "label": "hard" if soft is None else "soft",
        "select": select,
        "seeds": [int(s) for s in seeds],
        "acc": accs,
        "mean": mean,
        "low": low,
        "high": high,
        "level": level,
        "epoch": epochs_used,
        "val_acc": vals,
        "n_syn": len(x_syn),
    }


def cross_architecture(
    arches: Sequence[str],
    in_shape: Sequence[int],
    classes: int,
    x_syn: torch.Tensor,
    y_syn: torch.Tensor,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """`evaluate_set` of one set on several architectures (e.g. distilled through "cnn", scored on "mlp"
    and "vit"): a set that only helps the network it was distilled with has overfit that network.
    `options` maps an arch to its build options; `kwargs` go to `evaluate_set` unchanged. Every arch is
    built once first, so a bad name fails before any training."""
    options = options or {}
    for arch in arches:
        build_model(arch, in_shape, classes, options.get(arch))
    return {
        arch: evaluate_set(arch, options.get(arch), in_shape, classes, x_syn, y_syn, **kwargs)
        for arch in arches
    }


# ------------------------------------------------------------------ DD-Ranking (Li et al. 2025)
#
# Definitions from DD-Ranking (Li et al. 2025, arXiv:2505.13300; github.com/NUS-HPC-AI-Lab/DD-Ranking,
# README "Label-Robust Score" and doc/introduction.md; ddranking/metrics compute_metrics):
#   HLR = Acc(real-hard) - Acc(syn-hard)
#   IOR = Acc(syn-any) - Acc(rdm-any)   ("any": the method's own labelling, applied to both sets)
#   alpha = w * IOR - (1 - w) * HLR,  w in [0, 1], default 0.5
#   score = (e^alpha - e^-1) / (e - e^-1)   (called DD-Ranking Score, DDRS, in early versions and
#                                            Label-Robust Score, LRS, later; ARS uses the same map)
# The map sends alpha in [-1, 1] to [0, 1] only when accuracies are fractions; the reference code feeds
# percentages (its accuracy meter and cached full-data accuracies are in %), where the "normalisation"
# no longer bounds anything. Accuracies here must be fractions, and every function checks that.
