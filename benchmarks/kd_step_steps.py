"""kd_step benchmark, part 1: one optimizer step of each variant, and their step times side by side.

Variants: `logit_kd` (forward KL, JSD beta 0.5) as an engine step; (a) strict baseline: distill's own
fused chunked-head CE step (SFTMethod) through the same engine step + LiveTeacherSource.signal with every
logits chunk materialised; (b) conventional baseline: HF `student(..., labels=...)` backward + step, plus
HF `teacher(...)` under no_grad.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel

from distill.data.batching import IGNORE, Batch
from distill.engine.optim import group_settings, make_adamw
from distill.engine.trainer import accumulate_gradients
from distill.methods.base import Method
from distill.methods.lm.base import LMContext
from distill.methods.lm.cross_entropy import SFTMethod
from distill.methods.lm.logit_kd import LogitKD
from distill.recipe import LogitKDConfig, SFTConfig, TrainConfig
from distill.teachers.base import TeacherSource
from distill.teachers.live import LiveTeacherSource
from kd_step_data import Pair, hf_labels
from kd_step_measure import log, sync

StepFn = Callable[[Batch], None]
KD_KINDS = {"kd_forward_kl": "forward_kl", "kd_jsd": "jsd"}
STEP_KINDS = ("kd_forward_kl", "kd_jsd", "ce_teacher", "hf_ce_teacher")
FIXED_BATCHES = 2  # distinct fixed batches the step-time variants cycle through


def engine_optimizer(student: PreTrainedModel) -> torch.optim.Optimizer:
    """The engine's optimizer (fused AdamW where available) over the student."""
    return make_adamw(list(student.parameters()), group_settings(TrainConfig(lr=1e-5), "main"))


def make_step(
    kind: str,
    pair: Pair,
    student: PreTrainedModel,
    opt: torch.optim.Optimizer,
    acc: Accelerator,
    chunk_size: int,
) -> StepFn:
    """One optimizer step of `kind` on `student` (shared teacher, shared optimizer)."""
    live = LiveTeacherSource(pair.teacher, pair.vocab)

    def context(teacher: TeacherSource | None) -> LMContext:
        return LMContext(student=student, teacher=teacher, vocab_size=pair.vocab, chunk_size=chunk_size)

    def engine_step(method: Method) -> StepFn:
        """What the engine does per update: prepare the micro-batch without gradients, accumulate, step."""
        wrapped = {name: acc.prepare(module) for name, module in method.modules().items()}
        phase = method.phases()[0]

        def step(batch: Batch) -> None:
            with torch.no_grad():
                micro = [method.prepare(batch, phase)]
            accumulate_gradients(acc, method, wrapped, micro, phase)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    if kind in KD_KINDS:
        cfg = LogitKDConfig(divergence=KD_KINDS[kind], beta=0.5)  # type: ignore[arg-type]
        return engine_step(LogitKD(cfg, context(live)))

    if kind == "ce_teacher":
        sft_step = engine_step(SFTMethod(SFTConfig(), context(None)))

        def ce_teacher(batch: Batch) -> None:
            signal = live.signal(batch, batch.targets != IGNORE)
            for start in range(0, signal.num_rows, chunk_size):
                signal.logits(start, min(start + chunk_size, signal.num_rows))  # materialised, then dropped
            sft_step(batch)

        return ce_teacher

    if kind == "hf_ce_teacher":

        def hf_ce_teacher(batch: Batch) -> None:
            out = student(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=hf_labels(batch)
            )
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                pair.teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask)

        return hf_ce_teacher

    raise ValueError(f"unknown step kind {kind!r}")


@dataclass
class StepTimes:
    """Per variant, one value per repetition: wall seconds and process CPU seconds per optimizer step."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]


def measure_step_times(
    pair: Pair, batches: list[Batch], acc: Accelerator, reps: int, steps: int, chunk_size: int
) -> StepTimes:
    """Seconds per optimizer step of every variant, one value per repetition (mean over `steps` steps).

    Variants share one student and optimizer (updates do not change the cost) and are interleaved step
    by step; the order rotates with every repetition. Process CPU time is recorded too: on a shared
    machine it is far less sensitive than wall time to other processes taking the cores."""
    student = copy.deepcopy(pair.student).train()
    opt = engine_optimizer(student)
    fns = {k: make_step(k, pair, student, opt, acc, chunk_size) for k in STEP_KINDS}
    for kind, fn in fns.items():  # warm-up: allocator, thread pools, optimizer state
        fn(batches[0])
        log(f"warm-up {kind} done")
    out = StepTimes(wall={k: [] for k in fns}, cpu={k: [] for k in fns})
    for rep in range(reps):
        names = list(fns)
        names = names[rep % len(names) :] + names[: rep % len(names)]
        wall = dict.fromkeys(names, 0.0)
        cpu = dict.fromkeys(names, 0.0)
        for i in range(steps):
            batch = batches[i % len(batches)]
            for name in names:
                sync(pair.device)
                t0, c0 = time.perf_counter(), time.process_time()
                fns[name](batch)
                sync(pair.device)
                wall[name] += time.perf_counter() - t0
                cpu[name] += time.process_time() - c0
        for name in names:
            out.wall[name].append(wall[name] / steps)
            out.cpu[name].append(cpu[name] / steps)
        log(
            f"step times rep {rep + 1}/{reps} (wall | cpu): "
            + ", ".join(f"{n} {out.wall[n][-1]:.2f}s | {out.cpu[n][-1]:.2f}s" for n in fns)
        )
    return out
