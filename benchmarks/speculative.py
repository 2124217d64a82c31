#!/usr/bin/env python
"""Drafters for speculative decoding of SmolLM2-135M-Instruct: acceptance and wall-clock speed-up.

    python benchmarks/speculative.py --part train --seeds 0 1 2 --steps 40   # recipe smollm2-drafter
    python benchmarks/speculative.py --part alpha                            # acceptance of every drafter
    python benchmarks/speculative.py --part speed                            # batch-1 speed-up, one drafter
    python benchmarks/speculative.py --report docs/benchmarks/speculative.md

Drafters: the 2-layer pruned copy of the target before training ("undistilled", the same start for every
seed), `drafter` (DistillSpec: TVD on the drafter's own samples, scored by the target) and `off-policy`
(the same loss on the target's answers), each trained once per seed for the same steps.
Acceptance alpha is measured on held-out prompts never used for training or selection: batched
speculative decoding, gamma 4, greedy and temperature 1; alpha = accepted / drafts the target judged
(drafts after a rejection are discarded unseen), i.e. the per-token acceptance rate of Leviathan et al.
The speed-up is measured at batch 1, target-only and speculative decoding alternating per prompt, for the
pre-declared `drafter` of seed 0 (no selection on held-out numbers), at gamma 4 and adaptive gamma.
"""

# ruff: noqa: E402 - the OpenMP setting below must precede the first torch import
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from distill.data.records import read_examples
from distill.data.tokenize import prompt_ids
from distill.generation.sampling import SamplingSpec
from distill.generation.speculative import eos_token_ids, generate_speculative
from distill.io import write_json_atomic
from distill.models.loading import load_model
from distill.models.student import prune_depth
from distill.pipeline import run_recipe
from distill.progress import NullProgress
from distill.recipe import Recipe, load_recipe
from report_output import emit, interval

OUT = Path("runs/bench/speculative")
LABELS = ["drafter", "off-policy"]
MODES = {"greedy": SamplingSpec(0.0), "T=1": SamplingSpec(1.0)}


def _recipe(seeds: list[int], steps: int) -> Recipe:
    recipe = load_recipe(
        "smollm2-drafter",
        [
            f"output_dir={OUT / 'train'}",
            f"seeds={json.dumps(seeds)}",
            f"train.steps={steps}",
            f"train.warmup_steps={max(1, steps // 10)}",
        ],
    )
    assert isinstance(recipe, Recipe)
    return recipe


def _target_and_prompts(recipe: Recipe, n: int) -> tuple[Any, Any, list[list[int]]]:
    assert recipe.teacher is not None and recipe.data.eval is not None
    loaded = load_model(recipe.teacher.model)
    tok = loaded.tokenizer
    prompts = [
        prompt_ids(tok, ex.prompt, recipe.data.system_prompt) for ex in read_examples(recipe.data.eval.path)
    ]
    return (
        loaded.model.eval(),
        tok,
        prompts[-n:],
    )  # the last held-out prompts (the recipe's eval uses the first)


def _student_dir(label: str, seed: int) -> Path:
    """Where the pipeline exported a method's student (a one-seed run has no seed folder)."""
    multi = OUT / "train" / "methods" / label / f"seed-{seed}" / "student"
    return multi if multi.is_dir() else OUT / "train" / "methods" / label / "student"


def _drafters(recipe: Recipe, target: Any, seeds: list[int]) -> dict[str, Any]:
    assert recipe.student.prune is not None
    out: dict[str, Any] = {"undistilled": prune_depth(target, recipe.student.prune)[0].eval()}
    for label in LABELS:
        for s in seeds:
            folder = _student_dir(label, s)
            out[f"{label}/seed-{s}"] = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32
            ).eval()
    return out


def part_alpha(args: argparse.Namespace) -> dict[str, Any]:
    recipe = _recipe(args.seeds, args.steps)
    target, tok, prompts = _target_and_prompts(recipe, args.prompts)
    eos = eos_token_ids(target, tok)
    rows: dict[str, Any] = {}
    for name, draft in _drafters(recipe, target, args.seeds).items():
        for mode, spec in MODES.items():
            t0 = time.perf_counter()
            res = generate_speculative(
                target,
                draft,
                prompts,
                spec,
                args.max_new_tokens,
                gamma=4,
                eos_ids=eos,
                generator=torch.Generator().manual_seed(0),
                vocab=len(tok),
            )
            st = res.stats
            rows[f"{name}|{mode}"] = {
                "alpha": st.alpha_judged,
                "alpha_drafted": st.alpha,
                "alpha_per_position": st.alpha_per_position,
                "tokens_per_target_call": st.tokens_per_target_call,
                "seconds": time.perf_counter() - t0,
            }
            print(name, mode, rows[f"{name}|{mode}"], flush=True)
    return {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "rows": rows}


def part_speed(args: argparse.Namespace) -> dict[str, Any]:
    from distill.generation.speculate_command import measure

    recipe = _recipe(args.seeds, args.steps)
    target, tok, prompts = _target_and_prompts(recipe, args.speed_prompts)
    folder = _student_dir("drafter", 0)
    draft = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out: dict[str, Any] = {}
    for name, adaptive in (("gamma 4", False), ("adaptive gamma (start 2)", True)):
        out[name] = measure(
            target,
            draft,
            prompts,
            SamplingSpec(0.0),
            gamma=2 if adaptive else 4,
            max_new_tokens=args.max_new_tokens,
            seed=0,
            adaptive=adaptive,
            repeats=args.repeats,
            eos=eos_token_ids(target, tok),
            vocab=len(tok),
            progress=NullProgress(),
        )
        out[name].pop("repeats", None)
        print(
            name,
            {k: out[name][k] for k in ("alpha_judged", "tokens_per_target_call", "cost_ratio", "speedup")},
        )
    return out


def report(alpha: dict[str, Any] | None, speed: dict[str, Any] | None, seeds: list[int]) -> list[str]:
    lines: list[str] = []
    if alpha:
        rows = alpha["rows"]
        lines += [
            f"Acceptance alpha (accepted / judged drafts), gamma 4, {alpha['prompts']} held-out prompts, "
            f"≤ {alpha['max_new_tokens']} new tokens; mean [95 % t] over drafter seeds {seeds}:",
            "",
            "| drafter | alpha greedy | alpha T=1 | tokens / target call greedy | tokens / target call T=1 |",
            "|---|--:|--:|--:|--:|",
        ]
        names = ["undistilled"] + LABELS
        for name in names:
            keys = [name] if name == "undistilled" else [f"{name}/seed-{s}" for s in seeds]
            cells = [
                interval([rows[f"{k}|{m}"][field] for k in keys], digits=3)
                for field in ("alpha", "tokens_per_target_call")
                for m in MODES
            ]
            lines.append(f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
        for m in MODES:
            d = [
                rows[f"drafter/seed-{s}|{m}"]["alpha"] - rows[f"off-policy/seed-{s}|{m}"]["alpha"]
                for s in seeds
            ]
            lines.append(
                f"\n{m}: `drafter` − `off-policy` alpha per seed: {interval(d, digits=3, signed=True)}"
            )
    if speed:
        lines += [
            "",
            "Batch-1 wall clock, greedy, `drafter` seed 0 (pre-declared), target-only vs speculative alternating "
            "per prompt; median (min–max) over repetitions:",
            "",
            "| gamma | alpha | tokens / target call | draft/target cost | speed-up | predicted | identical |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for name, r in speed.items():
            sp, cost = r["speedup"], r["cost_ratio"]
            lines.append(
                f"| {name} | {r['alpha_judged']:.3f} | {r['tokens_per_target_call']:.2f} | {cost['median']:.2f} | "
                f"{sp['median']:.2f}× ({sp['min']:.2f}–{sp['max']:.2f}) | {r['predicted_speedup']:.2f}× | "
                f"{r['identical_outputs']}/{r['prompts']} |"
            )
    return lines


def main() -> None:
    global OUT
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["train", "alpha", "speed"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--speed-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--report", type=Path, default=None)
    p.add_argument("--out", type=Path, default=OUT, help="where runs and results go")
    args = p.parse_args()
    OUT = args.out
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part == "train":
        run_recipe(_recipe(args.seeds, args.steps))
    elif args.part in ("alpha", "speed"):
        result = part_alpha(args) if args.part == "alpha" else part_speed(args)
        write_json_atomic(OUT / f"{args.part}.json", result)
    saved = {
        k: json.loads((OUT / f"{k}.json").read_text())
        for k in ("alpha", "speed")
        if (OUT / f"{k}.json").is_file()
    }
    emit(report(saved.get("alpha"), saved.get("speed"), args.seeds), args.report)


if __name__ == "__main__":
    main()
