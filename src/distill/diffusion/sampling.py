"""Samplers over any x0 predictor on a noise path.

`ode`: the deterministic DDIM / Euler chain (teachers, progressive and reflow students, guidance-distilled
students); `heun` adds EDM's second-order correction (the teacher's reference sampler); `consistency`:
predict x0, re-noise to the next level with fresh noise, predict again (consistency models and DMD2's
multi-step generators). Every chain uses N uniform steps of t (for EDM, Karras' rho grid).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from distill.diffusion.paths import NoisePath, time_grid

X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t per row) -> x0
SamplerKind = Literal["ode", "heun", "consistency"]


def sample_chain(
    x0_fn: X0Fn,
    path: NoisePath,
    noise: torch.Tensor,
    steps: int,
    kind: SamplerKind = "ode",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run `steps` steps from x_1 = noise (already at the path's prior scale) down to t = 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = time_grid(steps, noise.device)
    x, n = noise, noise.shape[0]
    for i in range(steps):
        t, s = grid[i].expand(n), grid[i + 1].expand(n)
        x0 = x0_fn(x, t)
        if kind == "consistency":
            if i == steps - 1:
                return x0
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = path.noisy(x0, fresh, s)
            continue
        nxt = path.ddim_step(x0, x, t, s)
        if kind == "heun" and i < steps - 1:  # average the increments of both ends' (x0, eps)
            x0_next = x0_fn(nxt, s)
            da = (path.alpha(s) - path.alpha(t))[0]
            ds = (path.sigma(s) - path.sigma(t))[0]
            eps_sum = path.eps(x0, x, t) + path.eps(x0_next, nxt, s)
            nxt = x + 0.5 * (da * (x0 + x0_next) + ds * eps_sum)
        x = nxt
    return x


LabelledX0Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@torch.no_grad()
def generate(
    x0_fn: LabelledX0Fn,
    path: NoisePath,
    shape: tuple[int, ...],
    count: int,
    steps: int,
    kind: SamplerKind = "ode",
    seed: int = 0,
    labels: torch.Tensor | None = None,
    batch_size: int = 512,
) -> torch.Tensor:
    """`count` samples in batches (row i conditioned on labels[i] when given); the noise is a pure
    function of `seed`, so students and teachers are compared on the same starting noise."""
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        lab = labels[start : start + n] if labels is not None else None
        noise = path.prior((n, *shape), gen)
        chunks.append(sample_chain(_bind(x0_fn, lab), path, noise, steps, kind, gen))
    return torch.cat(chunks)


def _bind(x0_fn: LabelledX0Fn, labels: torch.Tensor | None) -> X0Fn:
    return lambda x, t: x0_fn(x, t, labels)
