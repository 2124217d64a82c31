"""The one training loop every method runs in, whatever it trains.

Owns devices and precision (Accelerate), the phase loop over named optimizer groups, gradient
accumulation with the loss normalised by the units of the whole accumulated, all-process update
(counted after the method's preparation), clipping per group, schedules, checkpoint/resume, metrics.
It knows methods only through `methods.base.Method` and imports no model library.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from distill.engine.accelerator import make_accelerator, zero_stage
from distill.engine.checkpoint import latest_intact_checkpoint, load_checkpoint, save_checkpoint
from distill.engine.optim import group_settings, make_adamw
from distill.engine.schedule import make_scheduler
from distill.engine.seeding import rng_state, seed_everything, set_rng_state
from distill.errors import RecipeError
from distill.io import write_text_atomic
from distill.methods.base import Method, Phase, StepContext, Stream
from distill.progress import NullProgress, Progress
from distill.recipe import TrainConfig


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class _Group:
    params: list[torch.nn.Parameter]
    optimizer: Any  # accelerate's AcceleratedOptimizer
    scheduler: Any
    max_grad_norm: float | None


def _rewrite_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop metric rows past the checkpoint so the file reads as one uninterrupted run."""
    if path.exists():
        keep = [
            line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= upto_step
        ]
        write_text_atomic(path, "".join(line + "\n" for line in keep))


def _build_groups(
    method: Method, cfg: TrainConfig, acc: Accelerator, wrapped: dict[str, torch.nn.Module]
) -> dict[str, _Group]:
    groups = method.groups()
    updates = {g: 0 for g in groups}
    for phase in method.phases():
        if phase.group not in groups:
            raise RecipeError(f"method {method.name}: phase steps unknown group {phase.group!r}")
        updates[phase.group] += phase.updates
    out: dict[str, _Group] = {}
    for name, module_names in groups.items():
        settings = group_settings(cfg, name)
        param_groups = []  # one per module: a module's `lr_scale` (synthetic images vs their labels) scales the lr
        for m in module_names:
            module = acc.unwrap_model(wrapped[m])
            trainable = [p for p in module.parameters() if p.requires_grad]
            if trainable:
                param_groups.append(
                    {"params": trainable, "lr": settings["lr"] * float(getattr(module, "lr_scale", 1.0))}
                )
        params = [p for g in param_groups for p in g["params"]]
        if not params:
            raise RecipeError(f"method {method.name}: optimizer group {name!r} has no trainable parameters")
        raw_opt = make_adamw(param_groups, settings)
        total = max(1, cfg.steps * updates[name])
        sched = make_scheduler(
            raw_opt, total=total, warmup=cfg.warmup_steps * max(1, updates[name]), kind=cfg.schedule
        )
        opt = acc.prepare(raw_opt)
        out[name] = _Group(params, opt, sched, settings["max_grad_norm"])
    return out


def next_micro_batches(
    acc: Accelerator, method: Method, stream: Stream, phase: Phase, grad_accum: int
) -> list[Any]:
    """The micro-batches of one update, on the device, prepared by the method without gradients."""
    micro = []
    for _ in range(grad_accum):
        batch = stream.next_batch().to(acc.device)
        with torch.no_grad():
            micro.append(method.prepare(batch, phase))
    return micro


def accumulate_gradients(
    acc: Accelerator,
    method: Method,
    wrapped: dict[str, torch.nn.Module],
    micro: list[Any],
    phase: Phase | None = None,
    step: int = 0,
) -> tuple[float, dict[str, float], dict[str, float]]:
    """Back-propagate the (prepared) micro-batches of one optimizer update of `phase`.

    Every micro-batch's loss is divided by the loss units of the whole update on all processes, so k
    micro-batches of B/k give the same gradient as one batch of B, and N processes the same as one.
    Returns (loss units on all processes, {"loss", parts...} as global means, summed batch stats)."""
    phase = phase or method.phases()[0]
    local = torch.tensor(
        [sum(float(method.loss_units(b, phase)) for b in micro)], dtype=torch.float64, device=acc.device
    )
    total_units = float(acc.gather(local).sum())
    # DDP averages gradients over processes, so each process divides by total/world to get a sum.
    normalizer = max(total_units, 1.0) / acc.num_processes
    ctx = StepContext(modules=wrapped, normalizer=normalizer, phase=phase, step=step, device=acc.device)
    parts_sum: dict[str, float] = {}
    stats: dict[str, float] = {}
    for i, batch in enumerate(micro):
        with contextlib.ExitStack() as stack:
            if i < len(micro) - 1:  # gradients synchronise on the last micro-batch only
                for module in wrapped.values():
                    stack.enter_context(acc.no_sync(module))
            stack.enter_context(acc.autocast())
            loss, parts = method.loss(ctx, batch)
            acc.backward(loss)
        for k, v in {"loss": float(loss.detach()), **parts}.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v / acc.num_processes
        for k, v in (batch.stats() if hasattr(batch, "stats") else {}).items():
            stats[k] = stats.get(k, 0.0) + float(v)
    if acc.num_processes > 1 and parts_sum:  # each process holds its share of the global mean
        summed = acc.reduce(
            torch.tensor(list(parts_sum.values()), dtype=torch.float64, device=acc.device), reduction="sum"
        )
        parts_sum = dict(zip(parts_sum, summed.tolist(), strict=True))
    return total_units, parts_sum, stats


def train(
    *,
    method: Method,
    stream: Stream,
    cfg: TrainConfig,
    out_dir: Path,
    seed: int,
    resume: bool = False,
    progress: Progress | None = None,
    accelerator: Accelerator | None = None,
) -> TrainResult:
    """Train `method`'s modules for cfg.steps steps (each step runs every phase once); return the history."""
    progress = progress or NullProgress()
    if not method.modules():  # a method with nothing to train (a selection baseline) is done when built
        return TrainResult(steps=0, seconds=0.0, history=[], resumed_from=None, notes=[])
    acc = accelerator or make_accelerator(cfg, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed + acc.process_index, cfg.deterministic)
    method.check_distributed(str(acc.distributed_type).split(".")[-1], zero_stage(acc))
    for module in method.frozen_modules().values():
        module.to(acc.device)
    raw = method.modules()
    wrapped = {name: acc.prepare(module) for name, module in raw.items()}
    groups = _build_groups(method, cfg, acc, wrapped)
    phases = method.phases()
    stream.shard(acc.process_index, acc.num_processes)

    ckpt_dir, metrics_path = out_dir / "checkpoints", out_dir / "metrics.jsonl"
    start_step, resumed_from = 0, None
    notes: list[str] = []
    last = None
    if resume:
        last, notes = latest_intact_checkpoint(ckpt_dir)
        for note in notes:
            progress.log(f"{note}; falling back to an older one")
    if last is not None:
        state = load_checkpoint(last, raw)
        for name, g in groups.items():
            g.optimizer.load_state_dict(state["optimizers"][name])
            g.scheduler.load_state_dict(state["schedulers"][name])
        stream.load_state_dict(state["data"])
        rngs = state["rng"]
        set_rng_state(rngs[acc.process_index] if acc.process_index < len(rngs) else rngs[0])
        method.load_state_dict(state["method"])
        start_step = resumed_from = int(state["step"])
        if notes:
            progress.log(f"resuming from {last.name}")
        if acc.is_main_process:
            _rewrite_metrics(metrics_path, start_step)
    elif acc.is_main_process and metrics_path.exists():
        metrics_path.unlink()
    if cfg.trackers:
        acc.init_trackers(out_dir.name)

    history: list[dict[str, Any]] = []
    for module in raw.values():
        module.train()
    progress.start(f"training {method.name}", cfg.steps)
    if start_step:
        progress.advance(start_step)
    started = time.perf_counter()
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        row: dict[str, Any] = {"step": step + 1}
        stats: dict[str, float] = {}
        for phase in phases:
            group = groups[phase.group]
            prefix = f"{phase.group}/" if len(phases) > 1 else ""
            for _ in range(phase.updates):
                micro = next_micro_batches(acc, method, stream, phase, cfg.grad_accum)
                units, parts, batch_stats = accumulate_gradients(acc, method, wrapped, micro, phase, step)
                grad_norm = None
                if group.max_grad_norm is not None:
                    grad_norm = float(acc.clip_grad_norm_(group.params, group.max_grad_norm))
                group.optimizer.step()
                group.scheduler.step()
                for g in groups.values():  # a phase may leave gradients on other groups' parameters
                    g.optimizer.zero_grad(set_to_none=True)
                method.after_step(phase, step)
                for k, v in batch_stats.items():
                    stats[k] = stats.get(k, 0.0) + v
            row.update({f"{prefix}{k}": v for k, v in parts.items()})
            row[f"{prefix}lr"] = group.scheduler.get_last_lr()[0]
            row[f"{prefix}grad_norm"] = grad_norm
            row[f"{prefix}loss_units"] = units
        dt = time.perf_counter() - t0
        if len(phases) > 1:
            row["loss"] = sum(row[f"{p.group}/loss"] for p in phases if f"{p.group}/loss" in row)
        row.update({k: int(v) if float(v).is_integer() else v for k, v in stats.items()})
        row["step_seconds"] = dt
        if "real_tokens" in stats:
            row["real_tokens_per_s"] = stats["real_tokens"] / dt if dt > 0 else 0.0
        history.append(row)
        if acc.is_main_process:
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        if cfg.trackers:
            acc.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=step + 1)
        progress.advance(1, f"loss {row['loss']:.4f}")
        done = step + 1
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            _checkpoint(acc, ckpt_dir, done, raw, groups, stream, method)
    progress.finish()
    if cfg.trackers:
        acc.end_training()
    for module in raw.values():
        module.eval()
    _forget(acc, wrapped, groups)
    seconds = time.perf_counter() - started
    return TrainResult(
        steps=cfg.steps, seconds=seconds, history=history, resumed_from=resumed_from, notes=notes
    )


def _forget(acc: Accelerator, wrapped: dict[str, torch.nn.Module], groups: dict[str, _Group]) -> None:
    """Drop this run's modules and optimizers from the accelerator's registries: it keeps every object it
    prepared, so a recipe training several methods (or seeds) on one accelerator would otherwise hold
    every earlier student and its optimizer state until the run ends."""
    done = {id(m) for m in wrapped.values()} | {id(g.optimizer) for g in groups.values()}
    acc._models = [m for m in acc._models if id(m) not in done]
    acc._optimizers = [o for o in acc._optimizers if id(o) not in done]


def _checkpoint(
    acc: Accelerator,
    ckpt_dir: Path,
    done: int,
    raw: dict[str, torch.nn.Module],
    groups: dict[str, _Group],
    stream: Stream,
    method: Method,
) -> None:
    """Written once, by the main process, with the RNG states of every process; loadable by all ranks."""
    from accelerate.utils import gather_object

    rngs = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
    if acc.is_main_process:
        state = {
            "step": done,
            "optimizers": {n: g.optimizer.state_dict() for n, g in groups.items()},
            "schedulers": {n: g.scheduler.state_dict() for n, g in groups.items()},
            "data": stream.state_dict(),
            "rng": rngs,
            "method": method.state_dict(),
        }
        save_checkpoint(ckpt_dir, done, raw, state)
    acc.wait_for_everyone()
