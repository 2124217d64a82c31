"""Gaussian noise paths x_t = alpha(t) x0 + sigma(t) eps on one time axis t in [0, 1].

Flow matching, VP (cosine, v-prediction) and EDM (Karras sigmas, preconditioned) differ only in alpha,
sigma, what the network outputs and how training draws t. Writing every sampler and every distillation
target against `x0(...)` and the DDIM update below makes each method work on all three; for EDM the
uniform t grid *is* the Karras rho-schedule, so "N uniform steps" means the usual grid of each family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

PathKind = Literal["flow", "vp", "edm"]
PATH_KINDS: tuple[str, ...] = ("flow", "vp", "edm")


@dataclass(frozen=True)
class NoisePath:
    kind: PathKind = "flow"
    sigma_min: float = 0.002  # EDM only
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5
    p_mean: float = -1.2  # EDM's log-normal training sigmas
    p_std: float = 1.2

    # ------------------------------------------------------------------ schedule

    def edm_sigma(self, t: torch.Tensor) -> torch.Tensor:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + t * (hi - lo)) ** self.rho

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "flow":
            return 1 - t
        if self.kind == "vp":
            return torch.cos(t * math.pi / 2)
        return torch.ones_like(t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "flow":
            return t
        if self.kind == "vp":
            return torch.sin(t * math.pi / 2)
        return self.edm_sigma(t)

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _b(self.alpha(t), x0) * x0 + _b(self.sigma(t), x0) * eps

    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """x_1: pure noise at the path's largest noise level."""
        scale = self.sigma_max if self.kind == "edm" else 1.0
        return scale * torch.randn(shape, generator=generator)

    def train_times(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise levels denoising training draws: uniform t, or EDM's log-normal sigma mapped to t."""
        if self.kind != "edm":
            return torch.rand(n, generator=generator).clamp(1e-4, 1.0)
        log_sigma = self.p_mean + self.p_std * torch.randn(n, generator=generator)
        sigma = log_sigma.exp().clamp(self.sigma_min, self.sigma_max)
        return self.time_of_sigma(sigma)

    def time_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return ((sigma ** (1 / self.rho) - lo) / (hi - lo)).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ parameterisation

    def net_input(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the network reads: EDM scales x to unit variance (c_in); the time feature is 1000 t."""
        if self.kind == "edm":
            s = self.sigma(t)
            x = x / _b(torch.sqrt(s**2 + self.sigma_data**2), x)
        return x, 1000.0 * t

    def _edm_skip_out(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, d = self.sigma(t), self.sigma_data
        c_skip = d**2 / (s**2 + d**2)
        c_out = s * d / torch.sqrt(s**2 + d**2)
        return _b(c_skip, like), _b(c_out, like)

    def x0(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean-sample estimate from the raw network output at (x, t)."""
        if self.kind == "flow":  # out = eps - x0 (velocity)
            return x - _b(t, x) * out
        if self.kind == "vp":  # out = alpha eps - sigma x0 (v-prediction)
            return _b(self.alpha(t), x) * x - _b(self.sigma(t), x) * out
        c_skip, c_out = self._edm_skip_out(t, x)
        return c_skip * x + c_out * out

    def output_for(self, x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The raw output whose x0 is `x0` at (x, t): the regression target of denoising training."""
        if self.kind == "flow":
            return (x - x0) / _b(t, x).clamp_min(1e-6)
        if self.kind == "vp":
            a, s = _b(self.alpha(t), x), _b(self.sigma(t), x)
            eps = (x - a * x0) / s.clamp_min(1e-6)
            return a * eps - s * x0
        c_skip, c_out = self._edm_skip_out(t, x)
        return (x0 - c_skip * x) / c_out

    def eps(self, x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise implied by an x0 estimate at (x, t)."""
        return (x - _b(self.alpha(t), x) * x0) / _b(self.sigma(t), x).clamp_min(1e-8)

    def ddim_step(self, x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Deterministic move from t to s < t keeping the implied noise: DDIM for VP, Euler for flow and
        EDM (their probability-flow ODE is linear in this parameterisation). s = 0 returns x0."""
        if bool((s <= 0).all()):
            return x0
        return _b(self.alpha(s), x) * x0 + _b(self.sigma(s), x) * self.eps(x0, x, t)

    def describe(self) -> dict[str, float | str]:
        if self.kind == "edm":
            return {"kind": "edm", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho,
                    "sigma_data": self.sigma_data}  # fmt: skip
        return {"kind": self.kind}


def _b(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-row (B,) or scalar tensor against a (B, ...) batch."""
    v = v.to(like.dtype) if v.is_floating_point() else v.float()
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def time_grid(steps: int, device: torch.device | None = None) -> torch.Tensor:
    """N uniform steps from t = 1 to t = 0 (N + 1 points)."""
    return torch.linspace(1.0, 0.0, steps + 1, device=device)
