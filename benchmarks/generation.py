"""Generation engine vs HF `generate`: greedy answers of the quickstart teacher to the quickstart prompts.

Both sides get the same prompts (chat template, sorted by length, batches of `--batch-size`, left
padding for HF), the same greedy settings and budget. HF `generate` runs the whole padded batch until its
last row ends; the engine runs the shared chat prefix once per batch and drops finished rows. Reports
generated tokens/s of each (median and range over interleaved repetitions) and how many answers are
token-for-token identical.

    python benchmarks/generation.py --reps 3 --threads 2 --markdown docs/benchmarks/generation.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from distill.data.records import read_examples
from distill.data.tokenize import prompt_ids
from distill.generation.engine import GenerationStats, generate_tokens
from distill.generation.sampling import SamplingSpec
from distill.models.loading import load_model
from distill.recipe import Recipe, load_recipe
from report_output import emit


def hf_generate(
    model, prompts: list[list[int]], steps: int, eos: int, pad: int, batch: int
) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """The loop the project used before the engine: sorted by length, left-padded, `model.generate`."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
            top_k=None,
            top_p=None,
            temperature=None,
        )
        for r, i in enumerate(idx):
            new = gen[r, width:].tolist()
            out[i] = new[: new.index(eos) + 1] if eos in new else new
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="first N prompts (default: all 576)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe("quickstart")
    assert isinstance(recipe, Recipe) and recipe.teacher is not None and recipe.data.eval is not None
    loaded = load_model(recipe.teacher.model)
    model, tok = loaded.model.eval(), loaded.tokenizer
    examples = read_examples(recipe.data.train.path) + read_examples(recipe.data.eval.path)
    prompts = [prompt_ids(tok, ex.prompt, recipe.data.system_prompt) for ex in examples][: args.limit]
    eos, pad = (
        int(tok.eos_token_id),
        int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id),
    )
    times: dict[str, list[float]] = {"HF generate": [], "engine": []}
    outputs: dict[str, list[list[int]]] = {}
    stats = GenerationStats()
    for rep in range(args.reps):
        for name in ("HF generate", "engine") if rep % 2 == 0 else ("engine", "HF generate"):
            t0 = time.perf_counter()
            with torch.no_grad():
                if name == "engine":
                    stats = GenerationStats()
                    rows = generate_tokens(
                        model,
                        prompts,
                        SamplingSpec(0.0),
                        args.max_new_tokens,
                        [eos],
                        pad_id=pad,
                        batch_size=args.batch_size,
                        stats=stats,
                    )
                    got = [r.tokens for r in rows]
                else:
                    got = hf_generate(model, prompts, args.max_new_tokens, eos, pad, args.batch_size)
            times[name].append(time.perf_counter() - t0)
            outputs[name] = got
            print(f"rep {rep} {name}: {times[name][-1]:.1f} s", flush=True)
    tokens = sum(len(t) for t in outputs["engine"])
    same = sum(a == b for a, b in zip(outputs["engine"], outputs["HF generate"], strict=True))
    lines = [
        f"Greedy answers of SmolLM2-135M-Instruct (fp32) to {len(prompts)} quickstart prompts, batch "
        f"{args.batch_size}, at most {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads, "
        f"{args.reps} interleaved repetitions; {tokens} generated tokens.",
        "",
        "| loop | seconds, median (min–max) | generated tokens/s |",
        "|---|--:|--:|",
    ]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med:.1f} ({min(ts):.1f}–{max(ts):.1f}) | {tokens / med:.1f} |")
    ratio = statistics.median(times["HF generate"]) / statistics.median(times["engine"])
    lines += [
        "",
        f"Engine speed-up: **{ratio:.2f}×** (median over median; per-repetition ratios "
        + ", ".join(f"{h / e:.2f}" for h, e in zip(times["HF generate"], times["engine"], strict=True))
        + ").",
        f"Identical answers: {same} of {len(prompts)}.",
        f"Prompt tokens not run thanks to the shared prefix: {stats.prefix_tokens_saved}; "
        f"row-steps skipped after a row finished: {stats.row_steps_saved}.",
    ]
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
