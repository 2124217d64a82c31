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

Files (next to this one, imported as top-level modules: running this script puts benchmarks/ on sys.path):
kd_step_measure.py (clocks, peak RSS, median/min-max), kd_step_data.py (models, answers, fixed batches),
kd_step_steps.py (1), kd_step_loops.py (2), kd_step_memory.py (3: workers re-invoke this script),
kd_step_trl.py (4), kd_step_report.py (the summary table).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from distill.data.tokenize import tokenize_examples
from distill.models.loading import load_model
from distill.recipe import load_recipe
from kd_step_data import build_pair, chat_rows, fixed_batches, teacher_answers
from kd_step_loops import measure_loops
from kd_step_measure import LoopRun, log
from kd_step_memory import MEMORY_KINDS, MemoryRises, measure_memory, memory_worker
from kd_step_report import print_table, summary_rows
from kd_step_steps import FIXED_BATCHES, measure_step_times
from kd_step_trl import trl_available


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
