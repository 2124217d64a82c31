#!/usr/bin/env python
"""What a speculative verifying forward costs on this machine: the target (SmolLM2-135M-Instruct, fp32)
fed 1, 2, 3, 5 or 8 new tokens after a 40-token K/V cache, median of 7 repetitions, per thread count.

    python benchmarks/verify_cost.py

Speculative decoding pays off when a (gamma + 1)-token forward costs about one 1-token step (Leviathan et
al.'s model). On a 2-core CPU it does not: one-token forwards use the BLAS matrix-vector kernel, wider
ones its matrix-matrix kernel (docs/on_policy.md has the figures).
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import DynamicCache

from distill.generation.engine import cache_keyword
from distill.models.loading import load_model
from distill.recipe import Recipe, load_recipe

WIDTHS = (1, 2, 3, 5, 8)


def main() -> None:
    recipe = load_recipe("quickstart")
    assert isinstance(recipe, Recipe) and recipe.teacher is not None
    model = load_model(recipe.teacher.model).model.eval()
    keyword = cache_keyword(model)
    prompt = torch.randint(0, 1000, (1, 40))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times: dict[int, list[float]] = {n: [] for n in WIDTHS}
        with torch.no_grad():
            for _ in range(7):
                for n in WIDTHS:
                    cache = DynamicCache(config=model.config)
                    model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{keyword: cache})
                    new = torch.randint(0, 1000, (1, n))
                    t0 = time.perf_counter()
                    model(input_ids=new, use_cache=True, logits_to_keep=n, **{keyword: cache})
                    times[n].append(time.perf_counter() - t0)
        base = statistics.median(times[1])
        cells = [
            f"{n} tokens {1000 * statistics.median(v):.1f} ms ({statistics.median(v) / base:.2f}x)"
            for n, v in times.items()
        ]
        print(f"threads {threads}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
