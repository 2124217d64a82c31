#!/usr/bin/env python
"""Speed and memory of a logit-KD training step on the quickstart pair, measured side by side in one run.

    python benchmarks/kd_step.py [--reps 3] [--steps N] [--no-trl] [--threads 1]

(`--threads 1` on a shared machine: two OpenMP threads on two busy cores make every time figure noise.)

Teacher: SmolLM2-135M-Instruct (GGUF, de-quantised to fp32); student: its 6-layer depth-pruned copy.
Four measurements, each repeated `--reps` times with the variants interleaved inside every repetition
(so machine noise hits them alike), after a warm-up; figures are the median and min-max over repetitions:

1. step time of `logit_kd` (forward KL, JSD beta=0.5) over "student CE step + teacher forward" on the
   same fixed batches (batch 4 x 256 real tokens, no padding), against two baselines:
   (a) strict: distill's own fused chunked-head CE step (SFTMethod) + LiveTeacherSource.signal with every logits
       chunk materialised;  (b) conventional: HF `student(..., labels=...)` backward + step, plus HF
       `teacher(...)` under no_grad.
2. real (non-padding) tokens/s of the engine's own loop (`distill.engine.trainer.train`) with logit_kd
   (forward KL) and the project's batching (length-grouped dynamic padding) over the quickstart data,
   with the live teacher's shared-prefix cache (the default) and without it.
3. peak-memory rise of a KD step over a CE step + teacher forward, each in a fresh subprocess.
4. TRL's GKD trainer (lmbda=0: no on-policy generation; beta=0, which TRL defines as forward KL) on the
   same data as chat messages: step time, real tokens/s, memory rise, and distill tokens/s / TRL tokens/s.

Not part of the test suite (tests/ never imports it). Needs `pip install -e .[bench]` for part 4.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import argparse
import contextlib
import copy
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.data.batching import IGNORE, Batch, BatchStream
from distill.data.generate import generate_completions
from distill.data.records import Example, read_examples
from distill.io import write_jsonl_atomic
from distill.data.tokenize import TokenizedExample, tokenize_examples
from distill.engine.trainer import accumulate_gradients, make_adamw, train
from distill.methods.base import Method
from distill.methods.lm.cross_entropy import SFTMethod
from distill.methods.lm.logit_kd import LogitKD
from distill.models.loading import fresh_copy, load_model
from distill.models.student import prune_depth
from distill.pipeline import stored_train_answers
from distill.recipe import SFTConfig, Recipe, TrainConfig, load_recipe
from distill.recipe import LogitKDConfig
from distill.teachers.live import LiveTeacherSource

StepFn = Callable[[Batch], None]
MEMORY_STEPS = 2
FIXED_BATCHES = 2  # distinct fixed batches the step-time variants cycle through

# ----------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------


@dataclass
class Spread:
    """Median and min-max of one figure over repetitions."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def fmt(self, digits: int = 2, unit: str = "") -> str:
        lo, hi = min(self.values), max(self.values)
        return f"{self.median:.{digits}f}{unit} ({lo:.{digits}f}-{hi:.{digits}f})"


def ratio(a: list[float], b: list[float]) -> Spread:
    """Per-repetition ratio a/b (both measured in the same repetition)."""
    return Spread([x / y for x, y in zip(a, b, strict=True)])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (and so ru_maxrss) to the current RSS, so that the peak of model
    loading does not hide the peak of the steps. Linux >= 4.0; returns False where unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak RSS. On Linux that is VmHWM: ru_maxrss is max(VmHWM, the RSS of the process that
    exec'd us), and our parent (holding both models) spawns the workers, so ru_maxrss would only report the
    parent's size."""
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if platform.system() == "Darwin" else kb * 1024


def trl_available() -> tuple[bool, str]:
    try:
        import trl
    except ImportError:
        return False, "trl is not installed (pip install -e .[bench])"
    try:
        _gkd_classes()
    except ImportError as err:
        return False, f"trl {trl.__version__} has no GKD trainer ({err})"
    return True, f"trl {trl.__version__}"


def _gkd_classes() -> tuple[type, type]:
    try:  # trl >= 0.24 moved GKD to trl.experimental
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer  # type: ignore[attr-defined,no-redef]
    return GKDConfig, GKDTrainer


# ----------------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------------


@dataclass
class Pair:
    recipe: Recipe
    teacher: PreTrainedModel
    student: PreTrainedModel  # the untrained pruned student; every variant trains a deep copy
    tokenizer: PreTrainedTokenizerBase
    vocab: int
    device: torch.device


def build_pair(
    recipe: Recipe, teacher: PreTrainedModel, tok: PreTrainedTokenizerBase, device: torch.device
) -> Pair:
    assert recipe.student.prune is not None
    teacher.to(device).eval()  # type: ignore[arg-type]
    student, _ = prune_depth(teacher, recipe.student.prune)
    student.to(device).train()  # type: ignore[arg-type]
    vocab = min(teacher.get_output_embeddings().weight.shape[0], len(tok))  # type: ignore[union-attr]
    return Pair(recipe, teacher, student, tok, vocab, device)


def teacher_answers(recipe: Recipe, pair: Pair, n_prompts: int) -> tuple[list[Example], str]:
    """The quickstart's cached teacher answers, or fresh ones for `n_prompts` prompts."""
    stored = stored_train_answers(recipe)
    if stored is not None:
        return read_examples(str(stored)), f"{stored} (the quickstart's stored teacher answers)"
    own = Path("runs") / "benchmarks" / f"kd_step_answers_{n_prompts}.jsonl"  # runs/ is git-ignored
    if own.exists():
        out = read_examples(str(own))
        rows = [json.loads(line) for line in own.read_text(encoding="utf-8").splitlines() if line.strip()]
        for ex, row in zip(out, rows, strict=True):
            ex.finished = bool(row.get("finished", True))  # no end token is learnt after a cut answer
        return out, f"{own} (this benchmark's earlier teacher answers)"
    prompts = read_examples(recipe.data.train.path)
    step = max(1, len(prompts) // n_prompts)
    prompts = prompts[::step][:n_prompts]  # spread over the file's categories
    assert recipe.data.generate is not None
    cfg = recipe.data.generate.model_copy(update={"max_new_tokens": 64})
    log(f"no stored quickstart answers (run `distill quickstart` first): the teacher answers {len(prompts)} prompts (max_new_tokens 64)")
    out = generate_completions(
        pair.teacher, pair.tokenizer, prompts, cfg, system_prompt=recipe.data.system_prompt
    )
    write_jsonl_atomic(
        own, [{**row, "finished": ex.finished} for row, ex in zip(chat_rows(out), out, strict=True)]
    )
    return out, f"{len(out)} quickstart prompts answered by the teacher now (saved to {own})"


def chat_rows(examples: list[Example]) -> list[dict[str, Any]]:
    return [
        {"messages": [*ex.prompt, {"role": "assistant", "content": ex.completion or ""}]} for ex in examples
    ]


def _example_targets(ex: TokenizedExample) -> list[int]:
    ids = ex.input_ids
    return [ids[i + 1] if i + 1 >= ex.prompt_len else IGNORE for i in range(len(ids) - 1)] + [IGNORE]


def fixed_batches(examples: list[TokenizedExample], batch_size: int, length: int, count: int) -> list[Batch]:
    """`count` batches of `batch_size` rows of exactly `length` real tokens: real examples concatenated
    (causally, like classic LM packing) and cut at the row end, so there is no padding at all and every
    variant sees identical tensors. Loss positions are the answer tokens, as in training."""
    need = count * batch_size * length
    ids: list[int] = []
    tgt: list[int] = []
    i = 0
    while len(ids) < need:
        ex = examples[i % len(examples)]
        ids.extend(ex.input_ids)
        tgt.extend(_example_targets(ex))
        i += 1
    input_ids = torch.tensor(ids[:need]).view(count, batch_size, length)
    targets = torch.tensor(tgt[:need]).view(count, batch_size, length)
    targets[..., -1] = IGNORE  # the next token lies in the next row
    positions = torch.arange(length).expand(batch_size, length)
    return [
        Batch(
            input_ids=input_ids[c].clone(),
            attention_mask=torch.ones(batch_size, length, dtype=torch.long),
            position_ids=positions.clone(),
            targets=targets[c].clone(),
            num_real_tokens=batch_size * length,
        )
        for c in range(count)
    ]


def hf_labels(batch: Batch) -> torch.Tensor:
    """HF-style labels (the model shifts them) with exactly the loss positions of `batch.targets`."""
    labels = torch.full_like(batch.input_ids, IGNORE)
    labels[:, 1:] = batch.targets[:, :-1]
    return labels


# ----------------------------------------------------------------------------------------------------
# The step variants (one optimizer step each)
# ----------------------------------------------------------------------------------------------------

KD_KINDS = {"kd_forward_kl": "forward_kl", "kd_jsd": "jsd"}
STEP_KINDS = ("kd_forward_kl", "kd_jsd", "ce_teacher", "hf_ce_teacher")


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

    def engine_step(method: Method, teacher: LiveTeacherSource | None, batch: Batch) -> None:
        accumulate_gradients(
            acc, student, method, [batch], teacher, chunk_size=chunk_size, vocab_size=pair.vocab
        )
        opt.step()
        opt.zero_grad(set_to_none=True)

    if kind in KD_KINDS:
        kd = LogitKD(LogitKDConfig(divergence=KD_KINDS[kind], beta=0.5))  # type: ignore[arg-type]
        return lambda batch: engine_step(kd, live, batch)

    if kind == "ce_teacher":
        sft = SFTMethod(SFTConfig())

        def ce_teacher(batch: Batch) -> None:
            signal = live.signal(batch, batch.targets != IGNORE)
            for start in range(0, signal.num_rows, chunk_size):
                signal.logits(start, min(start + chunk_size, signal.num_rows))  # materialised, then dropped
            engine_step(sft, None, batch)

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
    opt = make_adamw(list(student.parameters()), TrainConfig(lr=1e-5))  # the engine's optimizer
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
                _sync(pair.device)
                t0, c0 = time.perf_counter(), time.process_time()
                fns[name](batch)
                _sync(pair.device)
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


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------
# Training loops: distill's engine, TRL's GKD trainer
# ----------------------------------------------------------------------------------------------------


@dataclass
class LoopRun:
    """Timed steps of one training loop (warm-up steps excluded)."""

    seconds: float
    cpu_seconds: float  # process CPU time over the same steps
    real_tokens: int
    slots: int  # batch elements including padding
    steps: int

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.real_tokens / self.cpu_seconds

    @property
    def step_s(self) -> float:
        return self.seconds / self.steps


@dataclass
class StampProgress:
    """Progress hook that timestamps the end of every engine step (after its metrics row is written)."""

    stamps: list[tuple[float, float]] = field(default_factory=list)  # (wall, process CPU)

    def start(self, label: str, total: int | None) -> None:
        self.stamps = [_now()]

    def advance(self, n: int = 1, info: str = "") -> None:
        self.stamps.append(_now())

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
        update={
            "steps": warmup + steps,
            "checkpoint_every": 0,
            "tensorboard": False,
            "chunk_size": chunk_size,
        }
    )
    method = LogitKD(LogitKDConfig(divergence="forward_kl"))
    progress = StampProgress()
    with tempfile.TemporaryDirectory(prefix="kd_step_loop_") as tmp:
        result = train(
            student=copy.deepcopy(pair.student),
            method=method,
            stream=stream,
            teacher=LiveTeacherSource(pair.teacher, pair.vocab, prefix_cache=prefix_cache),
            cfg=cfg,
            out_dir=Path(tmp),
            vocab_size=pair.vocab,
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


class CountingCollator:
    """Wraps TRL's collator and records the real (attention-mask) tokens and slots of every batch it builds."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.inner = inner
        self.real: list[int] = []
        self.slots: list[int] = []

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.inner(examples)
        mask = out["attention_mask"]
        self.real.append(int(mask.sum()))
        self.slots.append(int(mask.numel()))
        return out


def make_trl_trainer(
    pair: Pair, rows: list[dict[str, Any]], steps: int, batch_size: int, max_length: int, out_dir: str
) -> tuple[Any, CountingCollator, list[tuple[float, float]]]:
    """TRL's GKDTrainer: lmbda=0 (no student generation), beta=0 (TRL: exactly forward KL), same student
    init, teacher, optimizer settings (AdamW, lr, clip) as the quickstart; no eval, no saving, no logging."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    gkd_config, gkd_trainer = _gkd_classes()
    stamps: list[tuple[float, float]] = []

    class Stamp(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(_now())

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(_now())

    train_cfg = pair.recipe.train
    args = gkd_config(
        output_dir=out_dir,
        per_device_train_batch_size=batch_size,
        max_length=max_length,
        lmbda=0.0,
        beta=0.0,
        max_steps=steps,
        learning_rate=train_cfg.lr,
        lr_scheduler_type="constant",
        max_grad_norm=train_cfg.max_grad_norm,
        weight_decay=train_cfg.weight_decay,
        gradient_accumulation_steps=1,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=pair.device.type == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=pair.recipe.seed,
        bf16=False,
        fp16=False,
    )
    trainer = gkd_trainer(
        model=copy.deepcopy(pair.student),
        teacher_model=pair.teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=pair.tokenizer,
        callbacks=[Stamp()],
    )
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training metrics dict
    return trainer, counter, stamps


def run_trl_loop(
    pair: Pair, rows: list[dict[str, Any]], steps: int, warmup: int, batch_size: int, max_length: int
) -> LoopRun:
    with tempfile.TemporaryDirectory(prefix="kd_step_trl_") as tmp, _quiet():
        trainer, counter, stamps = make_trl_trainer(pair, rows, warmup + steps, batch_size, max_length, tmp)
        trainer.train()
    # stamps[0] is train begin, stamps[k] the end of step k; the collator's k-th batch feeds step k.
    n = len(stamps) - 1
    timed = range(warmup, n)
    (w0, c0), (w1, c1) = stamps[warmup], stamps[n]
    return LoopRun(
        seconds=w1 - w0,
        cpu_seconds=c1 - c0,
        real_tokens=sum(counter.real[i] for i in timed),
        slots=sum(counter.slots[i] for i in timed),
        steps=len(timed),
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


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


# ----------------------------------------------------------------------------------------------------
# Memory: one fresh subprocess per variant
# ----------------------------------------------------------------------------------------------------

MEMORY_KINDS = ("ce_teacher", "kd_forward_kl", "kd_jsd", "hf_ce_teacher", "trl")
TARGET_MEMORY_KINDS = ("ce_teacher", "kd_forward_kl", "kd_jsd")


def prepare_memory_workdir(pair: Pair, batch: Batch, workdir: Path) -> None:
    """Save what the subprocesses load: the teacher (safetensors) and the batch."""
    plain = fresh_copy(pair.teacher)  # GGUF-loaded models refuse save_pretrained
    plain.load_state_dict(pair.teacher.state_dict())
    plain.save_pretrained(workdir / "teacher", safe_serialization=True)
    del plain
    pair.tokenizer.save_pretrained(workdir / "teacher")  # parsing the GGUF again would take seconds
    torch.save({"input_ids": batch.input_ids.cpu(), "targets": batch.targets.cpu()}, workdir / "batch.pt")


def memory_worker(kind: str, workdir: Path, chunk_size: int) -> dict[str, Any]:
    """Runs in a fresh process: load models, build the batch, then measure the rise of 2 steps."""
    recipe = load_recipe("quickstart")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    acc = Accelerator(cpu=device.type == "cpu")
    teacher = AutoModelForCausalLM.from_pretrained(str(workdir / "teacher"), dtype=torch.float32)
    pair = build_pair(recipe, teacher, AutoTokenizer.from_pretrained(str(workdir / "teacher")), device)
    saved = torch.load(workdir / "batch.pt")
    bsz, length = saved["input_ids"].shape
    batch = Batch(
        input_ids=saved["input_ids"],
        attention_mask=torch.ones(bsz, length, dtype=torch.long),
        position_ids=torch.arange(length).expand(bsz, length).clone(),
        targets=saved["targets"],
        num_real_tokens=bsz * length,
    ).to(device)
    if kind == "trl":
        run = _trl_memory_run(pair, batch, workdir)
    else:
        student = pair.student
        opt = make_adamw(list(student.parameters()), TrainConfig(lr=1e-5))  # the engine's optimizer
        fn = make_step(kind, pair, student, opt, acc, chunk_size)

        def run() -> None:
            for _ in range(MEMORY_STEPS):
                fn(batch)

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        pre = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        pre = current_rss_bytes()
        reset = reset_peak_rss()
        run()
        peak = peak_rss_bytes()
        how = "peak RSS (VmHWM, reset after loading)" if reset else "peak RSS (includes the loading peak!)"
    return {"kind": kind, "pre": pre, "peak": peak, "rise": peak - pre, "how": how}


def _trl_memory_run(pair: Pair, batch: Batch, workdir: Path) -> Callable[[], None]:
    """TRL on the identical rows (pre-tokenised; completion_mask marks the first answer token)."""
    rows = []
    for ids, tg in zip(batch.input_ids.tolist(), batch.targets.tolist(), strict=True):
        first = next((i for i, t in enumerate(tg) if t != IGNORE), len(tg) - 1) + 1
        rows.append(
            {"prompt": "", "input_ids": ids, "completion_mask": [0] * first + [1] * (len(ids) - first)}
        )
    trainer, _, _ = make_trl_trainer(
        pair, rows, MEMORY_STEPS, len(rows), len(rows[0]["input_ids"]), str(workdir / "trl")
    )
    return lambda: trainer.train()


MemoryRises = dict[str, list[int]]  # kind -> bytes, one per repetition it ran in


def measure_memory(
    pair: Pair, batch: Batch, kinds: list[str], reps: int, chunk_size: int, threads: int | None
) -> MemoryRises:
    """Peak-memory rise of every kind, each run in a fresh subprocess. The kinds with a target (CE + teacher,
    KD) run in every repetition; the others (HF, TRL: information only) in the first, to save time."""
    out: MemoryRises = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="kd_step_mem_") as tmp:
        prepare_memory_workdir(pair, batch, Path(tmp))
        for rep in range(reps):
            for kind in kinds if rep == 0 else [k for k in kinds if k in TARGET_MEMORY_KINDS]:
                rise = _memory_subprocess(kind, tmp, chunk_size, threads)
                if rise is not None:
                    out[kind].append(rise)
    return {k: v for k, v in out.items() if v}


def _memory_subprocess(kind: str, workdir: str, chunk_size: int, threads: int | None) -> int | None:
    cmd = [
        sys.executable,
        __file__,
        "--_memory-worker",
        kind,
        "--_workdir",
        workdir,
        "--chunk-size",
        str(chunk_size),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        log(f"memory {kind}: worker failed ({tail})")
        return None
    res = json.loads(lines[-1])
    log(
        f"memory {kind}: pre {res['pre'] / 2**20:.0f} MiB, peak {res['peak'] / 2**20:.0f} MiB, "
        f"rise {res['rise'] / 2**20:.0f} MiB [{res['how']}]"
    )
    return int(res["rise"])


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    figure: str
    value: str
    target: str = ""
    ok: bool | None = None

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("PASS" if self.ok else "FAIL")


def print_table(title: str, rows: list[Row]) -> None:
    w1 = max(len(r.figure) for r in rows)
    w2 = max(len(r.value) for r in rows)
    print(f"\n{title}")
    print(f"  {'figure':<{w1}}  {'median (min-max)':<{w2}}  {'target':<8}  result")
    for r in rows:
        print(f"  {r.figure:<{w1}}  {r.value:<{w2}}  {r.target:<8}  {r.verdict}")


def step_rows(times: StepTimes) -> list[Row]:
    wall, cpu = times.wall, times.cpu
    rows = [
        Row("step s: logit_kd forward KL", Spread(wall["kd_forward_kl"]).fmt(unit="s")),
        Row("step s: logit_kd JSD(0.5)", Spread(wall["kd_jsd"]).fmt(unit="s")),
        Row("step s: (a) distill CE + LiveTeacherSource fwd", Spread(wall["ce_teacher"]).fmt(unit="s")),
        Row("step s: (b) HF CE(labels) + HF teacher fwd", Spread(wall["hf_ce_teacher"]).fmt(unit="s")),
    ]
    for kind, label, target in (("kd_forward_kl", "fwd-KL", 1.05), ("kd_jsd", "JSD", 1.10)):
        r = ratio(wall[kind], wall["ce_teacher"])
        rows.append(Row(f"KD {label} / (a) strict", r.fmt(3), f"<= {target:.2f}", r.median <= target))
        rows.append(Row("  same, by process CPU time", ratio(cpu[kind], cpu["ce_teacher"]).fmt(3)))
    for kind, label in (("kd_forward_kl", "fwd-KL"), ("kd_jsd", "JSD")):
        rows.append(Row(f"KD {label} / (b) conventional", ratio(wall[kind], wall["hf_ce_teacher"]).fmt(3)))
    return rows


def memory_rows(pair: Pair, mem: MemoryRises) -> list[Row]:
    if "ce_teacher" not in mem:
        return []
    n = min(len(v) for k, v in mem.items() if k in TARGET_MEMORY_KINDS)
    base = [float(x) for x in mem["ce_teacher"][:n]]
    # The rise includes the gradients and AdamW's two moments (3 x the student's parameter bytes), which
    # every variant allocates alike; without them the transient part (activations, logits chunks) remains.
    state = 3 * sum(q.numel() * q.element_size() for q in pair.student.parameters())
    rows = []
    for k, label in (("kd_forward_kl", "fwd KL"), ("kd_jsd", "JSD")):
        if k not in mem:
            continue
        r = ratio([float(x) for x in mem[k][:n]], base)
        rows.append(Row(f"mem rise KD {label} / (a) CE+teacher", r.fmt(3), "<= 1.25", r.median <= 1.25))
        if min(base) > state:
            rows.append(
                Row(
                    "  same, minus grads+AdamW state",
                    ratio([x - state for x in mem[k][:n]], [x - state for x in base]).fmt(3),
                )
            )
    rows += [Row(f"mem rise MiB: {k}", Spread([x / 2**20 for x in v]).fmt(0)) for k, v in mem.items()]
    if "trl" in mem and "kd_forward_kl" in mem:
        trl = statistics.median(mem["trl"]) / statistics.median(mem["kd_forward_kl"])
        rows.append(Row("mem rise TRL GKD / distill KD fwd KL", f"{trl:.2f}"))
    return rows


def loop_rows(loops: dict[str, list[LoopRun]], trl_skipped: str | None) -> list[Row]:
    def padding(runs: list[LoopRun]) -> str:
        return f"{1 - sum(r.real_tokens for r in runs) / sum(r.slots for r in runs):.1%}"

    d, n = loops["distill"], loops["distill_no_prefix"]
    rows = [
        Row("distill loop real tok/s (fwd KL)", Spread([r.tokens_per_s for r in d]).fmt(0)),
        Row("distill loop s/step | padding", f"{Spread([r.step_s for r in d]).fmt(unit='s')} | {padding(d)}"),
        Row("  same without the teacher prefix cache", Spread([r.tokens_per_s for r in n]).fmt(0)),
        Row("  prefix cache speed-up", ratio([r.tokens_per_s for r in d], [r.tokens_per_s for r in n]).fmt(2)),
    ]
    if "trl" not in loops:
        return rows + [Row("TRL GKD", f"not run: {trl_skipped}")]
    t = loops["trl"]
    speedup = ratio([r.tokens_per_s for r in d], [r.tokens_per_s for r in t])
    rows += [
        Row("TRL GKD (beta=0: fwd KL) real tok/s", Spread([r.tokens_per_s for r in t]).fmt(0)),
        Row("TRL GKD s/step | padding", f"{Spread([r.step_s for r in t]).fmt(unit='s')} | {padding(t)}"),
        Row("distill tok/s / TRL tok/s", speedup.fmt(2), ">= 2.5", speedup.median >= 2.5),
        Row(
            "  same, distill without the prefix cache",
            ratio([r.tokens_per_s for r in n], [r.tokens_per_s for r in t]).fmt(2),
        ),
        Row(
            "  same, by process CPU time",
            ratio([r.tokens_per_cpu_s for r in d], [r.tokens_per_cpu_s for r in t]).fmt(2),
        ),
    ]
    return rows


def summary_rows(
    pair: Pair, times: StepTimes, loops: dict[str, list[LoopRun]], mem: MemoryRises, trl_skipped: str | None
) -> list[Row]:
    return step_rows(times) + loop_rows(loops, trl_skipped) + memory_rows(pair, mem)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--reps", type=int, default=3, help="repetitions of every measurement (default 3)")
    p.add_argument(
        "--steps", type=int, default=6, help="timed training-loop steps per repetition (default 6)"
    )
    p.add_argument(
        "--step-steps", type=int, default=2, help="timed steps per variant and repetition for part 1"
    )
    p.add_argument("--no-trl", action="store_true", help="skip TRL's GKD trainer")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--length", type=int, default=256, help="row length of the fixed batches and max_length")
    p.add_argument("--prompts", type=int, default=48, help="prompts to answer when no cached answers exist")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    p.add_argument("--_workdir", dest="workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, Path(args.workdir), args.chunk_size)))
        return 0

    started = time.perf_counter()
    recipe = load_recipe("quickstart")
    # the engine switches this on (process-wide) in train(); set it up front so every variant runs alike
    torch.use_deterministic_algorithms(recipe.train.deterministic, warn_only=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    acc = Accelerator(cpu=device.type == "cpu")
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    assert recipe.teacher is not None
    loaded = load_model(recipe.teacher.model)
    pair = build_pair(recipe, loaded.model, loaded.tokenizer, device)
    answers, source = teacher_answers(recipe, pair, args.prompts)
    tokenized, _ = tokenize_examples(pair.tokenizer, answers, args.length, recipe.data.system_prompt)
    batches = [b.to(device) for b in fixed_batches(tokenized, args.batch_size, args.length, FIXED_BATCHES)]
    loss_frac = sum(b.num_loss_tokens for b in batches) / sum(b.num_slots for b in batches)
    log(
        f"data: {len(tokenized)} examples from {source}; fixed batches {args.batch_size}x{args.length}, "
        f"{loss_frac:.0%} of positions carry loss; vocab {pair.vocab}"
    )
    use_trl, trl_note = (False, "--no-trl") if args.no_trl else trl_available()
    log(f"TRL: {trl_note}" if use_trl else f"TRL skipped: {trl_note}")

    # 1. step time
    times = measure_step_times(pair, batches, acc, args.reps, args.step_steps, args.chunk_size)
    # 2 + 4. training loops
    rows = chat_rows(answers) if use_trl else None
    loops: dict[str, list[LoopRun]] = {}
    try:
        loops = measure_loops(
            pair, tokenized, rows, acc, args.reps, args.steps, args.batch_size, args.length, args.chunk_size
        )
    except Exception as err:  # TRL is a moving target: report and go on with distill alone
        if rows is None:
            raise
        trl_note = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        log(f"TRL could not run: {trl_note}")
        use_trl = False
        loops = measure_loops(
            pair, tokenized, None, acc, args.reps, args.steps, args.batch_size, args.length, args.chunk_size
        )
    # 3 (+4). memory
    mem: MemoryRises = {}
    if not args.no_memory:
        kinds = [k for k in MEMORY_KINDS if k != "trl" or use_trl]
        mem = measure_memory(pair, batches[0], kinds, args.reps, args.chunk_size, args.threads)

    table = summary_rows(pair, times, loops, mem, None if use_trl else trl_note)
    print_table(
        f"kd_step summary: quickstart pair, batch {args.batch_size} x {args.length}, {args.reps} reps, "
        f"{torch.get_num_threads()} threads, {device} ({time.perf_counter() - started:.0f} s total)",
        table,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
