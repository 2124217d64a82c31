#!/usr/bin/env python
"""What handing the logits' storage to the divergence saves, measured side by side in one run.

    python benchmarks/divergence_buffers.py [--rows 600] [--vocab 49152] [--reps 5] [--threads 1]

`divergence_value_and_grad` on one chunk of student and teacher logits (the fused head's unit of work;
600 rows ~ the answer tokens of a 4 x 256 quickstart batch), for every divergence, twice: with fresh
output buffers (`reuse_* = False`, what any caller gets) and computing in the handed-over logits
(`reuse_student/reuse_teacher = True`, what the fused head does with its own logits and a live teacher's
fresh chunks). Prints the median (min-max) milliseconds over `--reps` interleaved repetitions and the
ratio. On CPU, a fresh (rows, V) float32 buffer costs a page fault per 4 KiB on first touch, so fewer
buffers is most of the gain. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distill.losses.tokens import DIVERGENCES, DivergenceSpec, divergence_value_and_grad


def _time(z0: torch.Tensor, y0: torch.Tensor, spec: DivergenceSpec, reuse: bool) -> float:
    z, y = z0.clone(), y0.clone()  # both variants pay the same copies, outside the timing
    t0 = time.perf_counter()
    value, grad = divergence_value_and_grad(z, y, spec, reuse_student=reuse, reuse_teacher=reuse)
    seconds = time.perf_counter() - t0
    del value, grad
    return seconds


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
    print(f"divergence value+grad on {args.rows} x {args.vocab} float32, {args.threads} thread(s), {args.reps} reps")
    print(f"{'divergence':<18}{'fresh buffers ms':>22}{'handed over ms':>22}{'ratio':>20}")
    for name in DIVERGENCES:
        spec = DivergenceSpec(name)
        _time(z0, y0, spec, False), _time(z0, y0, spec, True)  # warm-up
        fresh: list[float] = []
        reused: list[float] = []
        for _ in range(args.reps):
            fresh.append(_time(z0, y0, spec, False))
            reused.append(_time(z0, y0, spec, True))
        ratios = [b / a for a, b in zip(fresh, reused, strict=True)]

        def fmt(xs: list[float], scale: float = 1e3, digits: int = 0) -> str:
            return f"{statistics.median(xs) * scale:.{digits}f} ({min(xs) * scale:.{digits}f}-{max(xs) * scale:.{digits}f})"

        print(f"{name:<18}{fmt(fresh):>22}{fmt(reused):>22}{fmt(ratios, 1.0, 2):>20}")


if __name__ == "__main__":
    main()
