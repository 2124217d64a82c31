#!/usr/bin/env python
"""Speed and memory of an on-policy distillation step (GKD, lmbda 1): distill's `on_policy` against TRL's
GKDTrainer, side by side in one run, on the quickstart pair.

    python benchmarks/on_policy.py [--reps 3] [--steps 4] [--batch-size 8] [--max-new-tokens 32] [--threads 2]

Teacher: SmolLM2-135M-Instruct (GGUF, de-quantised to fp32); student: its 6-layer depth-pruned copy (a
fresh deep copy for every variant and repetition). Prompts: `--prompts` quickstart train prompts, spread
over the file, chat-templated with the recipe's system prompt (`distill.data.tokenize.prompt_ids`); step k
of either side gets the same `--batch-size` prompts (distill: a fixed stream; TRL: its sequential sampler
over the same pre-tokenised ids). Same on both sides: max_new_tokens, sampling temperature (default 0.9,
TRL GKD's default) with top_k 0 and top_p 1 (TRL's fixed choice), EOS, the divergence (generalized JSD,
beta 0.5, at temperature 1: TRL's loss takes no temperature), AdamW (fused) with the quickstart's lr,
betas, weight decay and grad clip at a constant lr, one micro-batch per step, no eval/saving/logging.

Per step, distill (`OnPolicyKD` through the engine's step: `next_micro_batches` + `accumulate_gradients`,
clip, AdamW): `prepare` samples the completions with the project's generation engine (KV-cached, the
prompt prefix the rows share run once, finished rows leave the batch), re-collates prompt + completion
right-padded; `loss` runs the student body (hidden states), the live teacher (prefix-cached) and the
divergence through the fused chunked head, which never holds the (B, L, vocab) logits.
Per step, TRL: see on_policy_trl.py (HF `generate` over left-padded prompts, then full student and
teacher forwards materialising the whole (B, L, vocab) logits). Two TRL variants: `trl`, TRL's defaults
as they are (gradient checkpointing on, which makes GKD generate without a KV cache), and `trl_no_gc`,
`gradient_checkpointing=False` (KV-cached generate, no recompute: TRL's fastest setting here);
`--trl-defaults-only` skips the second.

Each repetition runs every variant, interleaved (the order rotating), each for 1 untimed warm-up step and
`--steps` timed steps. Counted from each side's own sampled batches: generated tokens (EOS included where
a row stopped on it) and real tokens = prompt + generated (what the student and the teacher score; padding
excluded). Sampling makes the completion lengths differ between the sides, hence tokens/s, not s/step,
is the figure to compare. Peak memory: the peak-RSS rise (CUDA: max allocated) of 2 steps over the loaded
models, each variant in a fresh subprocess (the kd_step benchmark's method).

Files: this one and on_policy_trl.py (TRL side); helpers from the kd_step benchmark.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.configs.on_policy import OnPolicyConfig, StudentSamplingConfig
from distill.data.batching import Batch, collate
from distill.data.records import read_examples
from distill.data.tokenize import TokenizedExample, prompt_ids
from distill.engine.trainer import _build_groups, accumulate_gradients, next_micro_batches
from distill.methods.lm.base import LMContext
from distill.methods.lm.on_policy import OnPolicyKD, SampledBatch, batch_prompts
from distill.models.loading import load_model
from distill.recipe import Recipe, load_recipe
from kd_step_data import Pair, build_pair, dense_batch
from kd_step_measure import Spread, current_rss_bytes, log, now, peak_rss_bytes, ratio, reset_peak_rss, sync
from kd_step_memory import prepare_memory_workdir
from kd_step_trl import quiet, trl_available
from on_policy_trl import OnPolicyRun, StepCount, make_gkd_trainer, run_trl, timed_run
from report_output import emit

WARMUP = 1
MEMORY_STEPS = 2
VARIANTS = ("distill", "trl", "trl_no_gc")
TRL_CHECKPOINTING = {"trl": None, "trl_no_gc": False}  # gradient checkpointing; None: TRL's default
LABELS = {
    "distill": "distill `on_policy`",
    "trl": "TRL `GKDTrainer`, defaults (gradient checkpointing, generate without KV cache)",
    "trl_no_gc": "TRL `GKDTrainer`, gradient_checkpointing=False (KV-cached generate)",
}


def setup() -> tuple[Recipe, torch.device, Accelerator]:
    """The quickstart recipe, the device and its accelerator; deterministic algorithms as the engine's
    `train()` switches them on (process-wide), so every variant runs alike."""
    recipe = load_recipe("quickstart")
    torch.use_deterministic_algorithms(recipe.train.deterministic, warn_only=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return recipe, device, Accelerator(cpu=device.type == "cpu")


def quickstart_prompts(pair: Pair, n: int) -> list[list[int]]:
    """`n` prompts spread over the quickstart train file, as the ids generation starts from."""
    recipe = pair.recipe
    examples = read_examples(recipe.data.train.path)
    examples = examples[:: max(1, len(examples) // n)][:n]
    return [prompt_ids(pair.tokenizer, ex.prompt, recipe.data.system_prompt) for ex in examples]


def step_batches(prompts: list[list[int]], count: int, batch_size: int) -> list[list[list[int]]]:
    """`count` batches of `batch_size` prompts, in order, wrapping around the prompts."""
    return [[prompts[(k * batch_size + i) % len(prompts)] for i in range(batch_size)] for k in range(count)]


def prompt_batch(prompts: list[list[int]], eos: int) -> Batch:
    """The prompts as a training batch: one answer token each, so `batch_prompts` recovers them exactly."""
    examples = [TokenizedExample(input_ids=[*p, eos], prompt_len=len(p)) for p in prompts]
    return collate(examples, [[i] for i in range(len(examples))], eos, packing=False)


class FixedStream:
    """The engine's stream interface (`next_batch`) over fixed batches, in order."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches, self.index = batches, 0

    def next_batch(self) -> Batch:
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        return batch


def on_policy_config(max_new_tokens: int, temperature: float) -> OnPolicyConfig:
    sample = StudentSamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0)
    return OnPolicyConfig(lmbda=1.0, divergence="jsd", beta=0.5, temperature=1.0, sample=sample)


def distill_step(
    pair: Pair, acc: Accelerator, cfg: OnPolicyConfig, chunk_size: int, steps: int
) -> Callable[[FixedStream], StepCount]:
    """The engine's optimizer update with `on_policy` on a fresh copy of the student (the groups, AdamW and
    clip of `distill.engine.trainer.train`, at a constant lr as TRL's)."""
    from distill.teachers.live import LiveTeacherSource

    student = copy.deepcopy(pair.student).train()
    ctx = LMContext(
        student=student,
        teacher=LiveTeacherSource(pair.teacher, pair.vocab),
        vocab_size=pair.vocab,
        chunk_size=chunk_size,
        tokenizer=pair.tokenizer,
        seed=pair.recipe.seed,
    )
    method = OnPolicyKD(cfg, ctx)
    train_cfg = pair.recipe.train.model_copy(
        update={"schedule": "constant", "warmup_steps": 0, "steps": steps}
    )
    wrapped = {name: acc.prepare(module) for name, module in method.modules().items()}
    groups = _build_groups(method, train_cfg, acc, wrapped)
    phase = method.phases()[0]
    group = groups[phase.group]

    def step(stream: FixedStream) -> StepCount:
        micro = next_micro_batches(acc, method, stream, phase, 1)
        accumulate_gradients(acc, method, wrapped, micro, phase)
        if group.max_grad_norm is not None:
            acc.clip_grad_norm_(group.params, group.max_grad_norm)
        group.optimizer.step()
        group.scheduler.step()
        group.optimizer.zero_grad(set_to_none=True)
        batch = micro[0]
        assert isinstance(batch, SampledBatch) and batch.on_policy  # lmbda=1
        return StepCount(batch.generated, batch.num_real_tokens - batch.generated, batch.input_ids.numel())

    return step


def run_distill(
    pair: Pair, acc: Accelerator, cfg: OnPolicyConfig, batches: list[list[list[int]]], chunk_size: int
) -> OnPolicyRun:
    eos = int(pair.tokenizer.eos_token_id)
    stream = FixedStream([prompt_batch(b, eos).to(pair.device) for b in batches])
    step = distill_step(pair, acc, cfg, chunk_size, len(batches))
    stamps, counts = [now()], []
    for _ in batches:
        counts.append(step(stream))
        sync(pair.device)
        stamps.append(now())
    return timed_run(stamps, counts, WARMUP)


def measure_speed(
    pair: Pair,
    acc: Accelerator,
    args: argparse.Namespace,
    batches: list[list[list[int]]],
    note: str | None,
) -> tuple[dict[str, list[OnPolicyRun]], str | None]:
    """Every variant in every repetition, the order rotating. `note`: why TRL is not run (None: run it);
    a TRL failure leaves distill alone, and the returned note says why."""
    cfg = on_policy_config(args.max_new_tokens, args.temperature)
    names = [v for v in VARIANTS if v == "distill" or (note is None and v in args.trl_variants)]
    runs: dict[str, list[OnPolicyRun]] = {v: [] for v in names}
    for rep in range(args.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            if name == "distill":
                runs[name].append(run_distill(pair, acc, cfg, batches, args.chunk_size))
            elif note is None:
                try:
                    run, gen_note = run_trl(
                        pair, batches, WARMUP, args.max_new_tokens, args.temperature, TRL_CHECKPOINTING[name]
                    )
                except Exception as err:  # TRL is a moving target: report and go on with distill alone
                    note = f"TRL failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
                    log(note)
                    continue
                runs[name].append(run)
                if rep == 0:
                    log(f"{name} generation config: {gen_note}")
            gc.collect()
        log(
            f"rep {rep + 1}/{args.reps}: "
            + "; ".join(
                f"{n} {r[-1].step_s:.2f} s/step, {r[-1].generated / r[-1].steps:.0f} generated/step, "
                f"{r[-1].generated_per_s:.1f} generated tok/s, {r[-1].tokens_per_s:.1f} real tok/s"
                for n, r in runs.items()
                if r and len(r) == rep + 1
            )
        )
    # a TRL failure drops its partial figures: ratios pair the repetitions
    return {k: v for k, v in runs.items() if v and (note is None or k == "distill")}, note


# ---- peak memory, each variant in a fresh subprocess ----


def memory_worker(kind: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Load the saved teacher and prompts, build the variant, then measure the rise of MEMORY_STEPS steps."""
    recipe, device, acc = setup()
    teacher = AutoModelForCausalLM.from_pretrained(str(workdir / "teacher"), dtype=torch.float32)
    pair = build_pair(recipe, teacher, AutoTokenizer.from_pretrained(str(workdir / "teacher")), device)
    saved = torch.load(workdir / "batch.pt")
    prompts = batch_prompts(dense_batch(saved["input_ids"], saved["targets"]))
    batches = [prompts] * MEMORY_STEPS
    run: Callable[[], None]
    if kind in TRL_CHECKPOINTING:
        tmp = tempfile.TemporaryDirectory(prefix="on_policy_trl_mem_")
        gkd = make_gkd_trainer(
            pair,
            prompts * MEMORY_STEPS,
            MEMORY_STEPS,
            len(prompts),
            args.max_new_tokens,
            args.temperature,
            tmp.name,
            TRL_CHECKPOINTING[kind],
        )

        def run() -> None:
            with quiet():
                gkd.trainer.train()

    else:
        eos = int(pair.tokenizer.eos_token_id)
        stream = FixedStream([prompt_batch(b, eos).to(device) for b in batches])
        cfg = on_policy_config(args.max_new_tokens, args.temperature)
        step = distill_step(pair, acc, cfg, args.chunk_size, MEMORY_STEPS)

        def run() -> None:
            for _ in batches:
                step(stream)

    gc.collect()
    sync(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        how = "CUDA max allocated, rise"
    else:
        how = "peak RSS rise" if reset_peak_rss() else "peak RSS rise (includes the loading peak!)"
    pre = torch.cuda.memory_allocated() if cuda else current_rss_bytes()
    run()
    sync(device)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    return {"kind": kind, "rise": peak - pre, "how": how}


def measure_memory(
    pair: Pair, prompts: list[list[int]], kinds: list[str], args: argparse.Namespace
) -> dict[str, int]:
    out: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="on_policy_mem_") as tmp:
        eos = int(pair.tokenizer.eos_token_id)
        prepare_memory_workdir(pair, prompt_batch(prompts, eos), Path(tmp))
        for kind in kinds:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-worker", kind, "--_workdir", tmp]
            cmd += ["--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature)]
            cmd += ["--chunk-size", str(args.chunk_size)] + (
                ["--threads", str(args.threads)] if args.threads else []
            )
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                log(
                    f"memory {kind}: worker failed ({(proc.stderr.strip().splitlines() or ['no output'])[-1]})"
                )
                continue
            res = json.loads(lines[-1])
            out[kind] = int(res["rise"])
            log(f"memory {kind}: {res['how']} {res['rise'] / 2**20:.0f} MiB")
    return out


# ---- report ----


def report(
    title: str,
    runs: dict[str, list[OnPolicyRun]],
    mem: dict[str, int],
    note: str | None,
    args: argparse.Namespace,
) -> list[str]:
    def mib(kind: str) -> str:
        return f"{mem[kind] / 2**20:.0f} MiB" if kind in mem else "-"

    lines = [
        f"## {title}",
        "",
        "| variant | s/step, median (min-max) | generated tok/step | generated tok/s | real tok/s "
        "(generated + prompt) | real tok/CPU-s | forward slots / real tokens | peak memory rise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in runs.items():
        label = LABELS[name]
        lines.append(
            f"| {label} | {Spread([r.step_s for r in rs]).fmt(2, ' s')} "
            f"| {statistics.median(r.generated / r.steps for r in rs):.0f} "
            f"| {Spread([r.generated_per_s for r in rs]).fmt(1)} | {Spread([r.tokens_per_s for r in rs]).fmt(1)} "
            f"| {Spread([r.tokens_per_cpu_s for r in rs]).fmt(1)} "
            f"| {statistics.median(r.slots / r.real_tokens for r in rs):.2f} | {mib(name)} |"
        )
    lines.append("")
    d = runs["distill"]
    for name in [k for k in runs if k != "distill"]:
        t = runs[name]
        real = ratio([r.tokens_per_s for r in d], [r.tokens_per_s for r in t])
        gen = ratio([r.generated_per_s for r in d], [r.generated_per_s for r in t])
        verdict = "met" if real.median >= 1.5 else "NOT met"
        memory = f"; peak memory {mem['distill'] / mem[name]:.2f}x" if {"distill", name} <= mem.keys() else ""
        lines.append(
            f"- distill / {name}, per repetition: real tok/s {real.fmt(2, 'x')} (target >= 1.5x: {verdict}); "
            f"generated tok/s {gen.fmt(2, 'x')}{memory}"
        )
    if note is not None:
        lines.append(f"- TRL not measured: {note}")
    lines += [
        "",
        f"Settings: batch {args.batch_size} prompts, max_new_tokens {args.max_new_tokens}, sampling temperature "
        f"{args.temperature} (top_k 0, top_p 1), generalized JSD beta 0.5, lmbda 1; {WARMUP} warm-up + "
        f"{args.steps} timed steps per variant and repetition; memory: {MEMORY_STEPS} steps in a fresh process.",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--reps", type=int, default=3, help="repetitions, variants interleaved (default 3)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant and repetition (default 4)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per step (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (TRL GKD's default)")
    p.add_argument("--prompts", type=int, default=64, help="quickstart prompts the batches cycle through")
    p.add_argument("--chunk-size", type=int, default=1024, help="distill's head chunk (the quickstart's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-trl", action="store_true", help="skip TRL's GKD trainer")
    p.add_argument(
        "--trl-defaults-only",
        action="store_true",
        help="run TRL with its defaults only (skip the gradient_checkpointing=False variant)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--markdown", type=Path, default=None, help="also write the report here")
    p.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    p.add_argument("--_workdir", dest="workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.trl_variants = ("trl",) if args.trl_defaults_only else ("trl", "trl_no_gc")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, Path(args.workdir), args)))
        return 0

    started = time.perf_counter()
    recipe, device, acc = setup()
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    assert recipe.teacher is not None
    loaded = load_model(recipe.teacher.model)
    pair = build_pair(recipe, loaded.model, loaded.tokenizer, device)
    prompts = quickstart_prompts(pair, args.prompts)
    batches = step_batches(prompts, WARMUP + args.steps, args.batch_size)
    lengths = [len(q) for b in batches for q in b]
    log(
        f"{len(prompts)} prompts, {min(lengths)}-{max(lengths)} tokens; eos {pair.tokenizer.eos_token_id} "
        f"(student generation_config: {pair.student.generation_config.eos_token_id}); vocab {pair.vocab}"
    )
    use_trl, trl_note = (False, "--no-trl") if args.no_trl else trl_available()
    log(f"TRL: {trl_note}" if use_trl else f"TRL skipped: {trl_note}")

    runs, note = measure_speed(pair, acc, args, batches, None if use_trl else trl_note)
    mem = {} if args.no_memory else measure_memory(pair, batches[0], [k for k in VARIANTS if k in runs], args)
    title = (
        f"on_policy vs TRL GKDTrainer, lmbda 1: quickstart pair, {args.reps} reps, "
        f"{torch.get_num_threads()} threads, {device} ({time.perf_counter() - started:.0f} s total)"
    )
    emit(report(title, runs, mem, note, args), args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
