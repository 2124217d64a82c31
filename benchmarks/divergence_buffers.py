#!/usr/bin/env python
"""What handing the logits' storage to the divergence, and row blocks, save: measured side by side in one run.

    python benchmarks/divergence_buffers.py [--rows 600] [--vocab 49152] [--reps 5] [--threads 1]

`divergence_value_and_grad` on one chunk of student and teacher logits (the fused head's unit of work;
600 rows ~ the answer tokens of a 4 x 256 quickstart batch), for every divergence, three ways,
interleaved: whole chunk with fresh output buffers (`reuse_* = False`, `block_elements=None`); whole
chunk computed in the handed-over logits (`reuse_student/reuse_teacher = True`, what the fused head does
with its own logits and a live teacher's fresh chunks); handed over and in row blocks of
`CPU_BLOCK_ELEMENTS` (the default on CPU), so that every sweep of a block runs in cache. Prints the
median (min-max) milliseconds over `--reps` repetitions and the ratios. On CPU, a fresh (rows, V)
float32 buffer costs a page fault per 4 KiB on first touch, and a whole chunk streams from memory on
each of the 10-20 sweeps of a divergence. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distill.losses.tokens import CPU_BLOCK_ELEMENTS, DIVERGENCES, DivergenceSpec, divergence_value_and_grad

VARIANTS = {  # name: (reuse, block_elements)
    "fresh": (False, None),
    "handed over": (True, None),
    "+ row blocks": (True, CPU_BLOCK_ELEMENTS),
}


def _time(z0: torch.Tensor, y0: torch.Tensor, spec: DivergenceSpec, variant: str) -> float:
    reuse, block = VARIANTS[variant]
    z, y = z0.clone(), y0.clone()  # every variant pays the same copies, outside the timing
    t0 = time.perf_counter()
    value, grad = divergence_value_and_grad(
        z, y, spec, reuse_student=reuse, reuse_teacher=reuse, block_elements=block
    )
    seconds = time.perf_counter() - t0
    del value, grad
    return seconds


def _fmt(xs: list[float], scale: float = 1e3, digits: int = 0) -> str:
    return f"{statistics.median(xs) * scale:.{digits}f} ({min(xs) * scale:.{digits}f}-{max(xs) * scale:.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(args.rows, args.vocab, generator=g) * 3
    y0 = torch.randn(args.rows, args.vocab, generator=g) * 3
    print(
        f"divergence value+grad on {args.rows} x {args.vocab} float32, {args.threads} thread(s), {args.reps} reps"
    )
    print(
        f"{'divergence':<16}"
        + "".join(f"{v + ' ms':>18}" for v in VARIANTS)
        + f"{'handed/fresh':>18}{'blocks/handed':>18}"
    )
    for name in DIVERGENCES:
        spec = DivergenceSpec(name)
        for v in VARIANTS:  # warm-up
            _time(z0, y0, spec, v)
        ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.reps):
            for v in VARIANTS:
                ms[v].append(_time(z0, y0, spec, v))
        handed = [b / a for a, b in zip(ms["fresh"], ms["handed over"], strict=True)]
        blocks = [b / a for a, b in zip(ms["handed over"], ms["+ row blocks"], strict=True)]
        print(
            f"{name:<16}"
            + "".join(f"{_fmt(ms[v]):>18}" for v in VARIANTS)
            + f"{_fmt(handed, 1.0, 2):>18}{_fmt(blocks, 1.0, 2):>18}"
        )


if __name__ == "__main__":
    main()
