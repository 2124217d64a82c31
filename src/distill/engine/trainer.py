"""The one training loop every method runs in.

Owns devices and precision (Accelerate), gradient accumulation with loss normalised per real token over
the whole accumulated, all-process batch, clipping, AdamW + schedule, checkpoint/resume, metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel

from distill.data.batching import Batch, BatchStream
from distill.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from distill.progress import NullProgress, Progress
from distill.engine.schedule import make_scheduler
from distill.engine.seeding import rng_state, seed_everything, set_rng_state
from distill.methods.base import Method, StepInput
from distill.models.body import LMBody
from distill.recipe import TrainConfig
from distill.teachers.base import TeacherSource


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None


def make_accelerator(cfg: TrainConfig, run_dir: Path) -> Accelerator:
    return Accelerator(
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        cpu=not torch.cuda.is_available(),
        log_with="tensorboard" if cfg.tensorboard else None,
        project_dir=str(run_dir),
    )


def _rewrite_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop metric rows past the checkpoint so the file reads as one uninterrupted run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= upto_step]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".metrics.")
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def accumulate_gradients(
    acc: Accelerator,
    model: torch.nn.Module,
    method: Method,
    micro: list[Batch],
    teacher: TeacherSource | None,
    *,
    chunk_size: int,
    vocab_size: int,
) -> tuple[float, dict[str, float]]:
    """Backward over the micro-batches of one optimizer step; returns (loss tokens, {"loss", parts...}).

    Every micro-batch's loss is divided by the real-token count of the whole step on all processes, so k
    micro-batches of B/k give the same gradient as one batch of B, and N processes the same as one.
    `model` is the student, or an `LMBody` of it as prepared by Accelerate (required for DDP/FSDP).
    """
    body = model if isinstance(acc.unwrap_model(model), LMBody) else LMBody(model)  # type: ignore[arg-type]
    student = acc.unwrap_model(body).lm

    def hidden(batch: Batch) -> torch.Tensor:
        out: torch.Tensor = body(batch.input_ids, batch.attention_mask, batch.position_ids)
        return out

    local = torch.tensor([sum(b.num_loss_tokens for b in micro)], dtype=torch.float64, device=acc.device)
    total_tokens = float(acc.gather(local).sum())
    # DDP averages gradients over processes, so each process divides by total/world to get a sum.
    normalizer = max(total_tokens, 1.0) / acc.num_processes
    parts_sum: dict[str, float] = {}
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1
        ctx = acc.no_sync(body) if not sync else contextlib.nullcontext()
        with ctx, acc.autocast():
            loss, parts = method.step(
                StepInput(
                    student=student,
                    hidden=hidden,
                    batch=batch,
                    teacher=teacher,
                    normalizer=normalizer,
                    chunk_size=chunk_size,
                    vocab_size=vocab_size,
                )
            )
            acc.backward(loss)
        parts = {"loss": float(loss.detach()), **parts}
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v / acc.num_processes
    if acc.num_processes > 1 and parts_sum:  # each process holds its share of the global mean
        summed = acc.reduce(torch.tensor(list(parts_sum.values()), device=acc.device), reduction="sum")
        parts_sum = dict(zip(parts_sum, summed.tolist(), strict=True))
    return total_tokens, parts_sum


def make_adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over all parameters: ~6x faster than the per-tensor version
    on CPU, 0.05 vs 0.30 s per step for the quickstart student), else the per-tensor one where a device
    or dtype has no fused kernel."""
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": cfg.betas, "weight_decay": cfg.weight_decay}
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def train(
    *,
    student: PreTrainedModel,
    method: Method,
    stream: BatchStream,
    teacher: TeacherSource | None,
    cfg: TrainConfig,
    out_dir: Path,
    vocab_size: int,
    seed: int,
    resume: bool = False,
    progress: Progress | None = None,
    accelerator: Accelerator | None = None,
) -> TrainResult:
    """Train `student` with `method` for cfg.steps optimizer steps; returns the metric history."""
    progress = progress or NullProgress()
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed, cfg.deterministic)
    acc = accelerator or make_accelerator(cfg, out_dir)
    params = [p for p in student.parameters() if p.requires_grad]
    for module in method.modules():
        params += [p for p in module.parameters() if p.requires_grad]
    opt = make_adamw(params, cfg)
    sched = make_scheduler(opt, total=cfg.steps, warmup=cfg.warmup_steps, kind=cfg.schedule)
    body, opt = acc.prepare(LMBody(student), opt)
    raw_student = acc.unwrap_model(body).lm
    modules: dict[str, torch.nn.Module] = {"student": raw_student}
    modules.update({f"method_{i}": m for i, m in enumerate(method.modules())})

    ckpt_dir = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    start_step = 0
    resumed_from: int | None = None
    last = latest_checkpoint(ckpt_dir) if resume else None
    if last is not None:
        state = load_checkpoint(last, modules)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        start_step = resumed_from = int(state["step"])
        _rewrite_metrics(metrics_path, start_step)
    elif metrics_path.exists():
        metrics_path.unlink()
    if cfg.tensorboard:
        acc.init_trackers(out_dir.name)

    history: list[dict[str, Any]] = []
    student.train()
    progress.start(f"training {method.name}", cfg.steps)
    if start_step:
        progress.advance(start_step)
    started = time.perf_counter()
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        micro = [stream.next_batch().to(acc.device) for _ in range(cfg.grad_accum)]
        total_tokens, parts_sum = accumulate_gradients(
            acc, body, method, micro, teacher, chunk_size=cfg.chunk_size, vocab_size=vocab_size
        )
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(acc.clip_grad_norm_(params, cfg.max_grad_norm))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        real = sum(b.num_real_tokens for b in micro)
        row: dict[str, Any] = {
            "step": step + 1,
            **parts_sum,
            "lr": sched.get_last_lr()[0],
            "grad_norm": grad_norm,
            "loss_tokens": int(total_tokens),
            "real_tokens": real,
            "padded_slots": sum(b.num_slots for b in micro),
            "step_seconds": dt,
            "real_tokens_per_s": real / dt if dt > 0 else 0.0,
        }
        history.append(row)
        if acc.is_main_process:
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        if cfg.tensorboard:
            acc.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=step + 1)
        progress.advance(1, f"loss {row['loss']:.4f}")
        done = step + 1
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            acc.wait_for_everyone()
            if acc.is_main_process:
                save_checkpoint(
                    ckpt_dir,
                    done,
                    modules,
                    {
                        "step": done,
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "data": stream.state_dict(),
                        "rng": rng_state(),
                    },
                )
    progress.finish()
    if cfg.tensorboard:
        acc.end_training()
    student.eval()
    return TrainResult(
        steps=cfg.steps, seconds=time.perf_counter() - started, history=history, resumed_from=resumed_from
    )
