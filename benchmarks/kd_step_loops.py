"""kd_step benchmark, parts 2 and 4: real tokens/s of whole training loops, distill's engine (with and
without the live teacher's prefix cache) and TRL's GKD trainer, alternating within every repetition."""

from __future__ import annotations

import copy
import gc
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from distill.data.batching import BatchStream
from distill.data.tokenize import TokenizedExample
from distill.engine.trainer import train
from distill.methods.lm.base import LMContext
from distill.methods.lm.logit_kd import LogitKD
from distill.recipe import LogitKDConfig
from distill.teachers.live import LiveTeacherSource
from kd_step_data import Pair
from kd_step_measure import LoopRun, log, now
from kd_step_trl import run_trl_loop


@dataclass
class StampProgress:
    """Progress hook that timestamps the end of every engine step (after its metrics row is written)."""

    stamps: list[tuple[float, float]] = field(default_factory=list)  # (wall, process CPU)

    def start(self, label: str, total: int | None) -> None:
        self.stamps = [now()]

    def advance(self, n: int = 1, info: str = "") -> None:
        self.stamps.append(now())

    def finish(self) -> None:
        pass

    def log(self, message: str) -> None:
        pass


def run_distill_loop(
    pair: Pair,
    examples: list[TokenizedExample],
    acc: Accelerator,
    steps: int,
    warmup: int,
    batch_size: int,
    max_length: int,
    chunk_size: int,
    prefix_cache: bool = True,
) -> LoopRun:
    """The engine's own loop (clip, AdamW, schedule, metrics.jsonl) with logit_kd forward KL."""
    recipe = pair.recipe
    stream = BatchStream(
        examples,
        batch_size,
        int(pair.tokenizer.pad_token_id or 0),
        seed=recipe.seed,
        group_by_length=True,
        packing=False,
        max_length=max_length,
    )
    cfg = recipe.train.model_copy(
        update={"steps": warmup + steps, "checkpoint_every": 0, "trackers": [], "chunk_size": chunk_size}
    )
    method = LogitKD(
        LogitKDConfig(divergence="forward_kl"),
        LMContext(
            student=copy.deepcopy(pair.student),
            teacher=LiveTeacherSource(pair.teacher, pair.vocab, prefix_cache=prefix_cache),
            vocab_size=pair.vocab,
            chunk_size=cfg.chunk_size,
        ),
    )
    progress = StampProgress()
    with tempfile.TemporaryDirectory(prefix="kd_step_loop_") as tmp:
        result = train(
            method=method,
            stream=stream,
            cfg=cfg,
            out_dir=Path(tmp),
            seed=recipe.seed,
            progress=progress,
            accelerator=acc,
        )
    timed = result.history[warmup:]
    (w0, c0), (w1, c1) = progress.stamps[warmup], progress.stamps[-1]
    return LoopRun(
        seconds=w1 - w0,
        cpu_seconds=c1 - c0,
        real_tokens=sum(h["real_tokens"] for h in timed),
        slots=sum(h["padded_slots"] for h in timed),
        steps=len(timed),
    )


def measure_loops(
    pair: Pair,
    examples: list[TokenizedExample],
    rows: list[dict[str, Any]] | None,
    acc: Accelerator,
    reps: int,
    steps: int,
    batch_size: int,
    max_length: int,
    chunk_size: int,
) -> dict[str, list[LoopRun]]:
    """distill's loop and (if given rows) TRL's, alternating within every repetition."""
    runners: dict[str, Callable[[], LoopRun]] = {
        "distill": lambda: run_distill_loop(
            pair, examples, acc, steps, 1, batch_size, max_length, chunk_size
        ),
        "distill_no_prefix": lambda: run_distill_loop(
            pair, examples, acc, steps, 1, batch_size, max_length, chunk_size, prefix_cache=False
        ),
    }
    if rows is not None:
        runners["trl"] = lambda: run_trl_loop(pair, rows, steps, 1, batch_size, max_length)
    out: dict[str, list[LoopRun]] = {k: [] for k in runners}
    for rep in range(reps):
        names = list(runners) if rep % 2 == 0 else list(reversed(runners))
        for name in names:
            out[name].append(runners[name]())
            gc.collect()
        log(
            f"loops rep {rep + 1}/{reps}: "
            + ", ".join(
                f"{n} {out[n][-1].tokens_per_s:.0f} tok/s, {out[n][-1].tokens_per_cpu_s:.0f} tok/cpu-s "
                f"({out[n][-1].step_s:.2f} s/step)"
                for n in runners
            )
        )
    return out
