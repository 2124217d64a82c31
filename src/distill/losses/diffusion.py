"""Generator losses of score distillation (DMD2, VSD, SiD) as pure functions of tensors.

Each takes the generator's sample x_g (B, ...) with its gradient and what the frozen / fake score networks
said about a noisy copy of it, and returns one loss per sample (mean over the sample's dimensions, the
same reduction as the denoising losses beside it). DMD and VSD are *surrogates*: their value means
nothing, their gradient with respect to x_g is the method's update direction (divided by the number of
dimensions D), written as 0.5 ||x_g - sg(x_g - g)||^2 so the engine's one backward pass applies it.
SiD is a real loss whose gradient also flows through `real` and `fake` when the caller computed them
with a graph back to x_g.
"""

from __future__ import annotations

import torch

MIN_SCALE = 1e-5  # floor of the per-sample normalisers mean|x_g - real| (a sample already on the mode)


def _row_mean(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).mean(1)


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def _surrogate(x_g: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 mean_d (x_g - sg(x_g - grad))^2 per sample: its gradient with respect to x_g is grad / D."""
    target = (x_g - grad).detach()
    return 0.5 * _row_mean((x_g - target) ** 2)


def dmd_gradient(x_g: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """DMD's update direction (fake - real) / mean_d |x_g - real| per sample (no graph): the difference
    of the two x0 estimates, normalised so samples far from the teacher's mode do not dominate."""
    with torch.no_grad():
        scale = _row_mean((x_g - real).abs()).clamp_min(MIN_SCALE)
        return (fake - real) / _rows(scale, x_g)


def dmd_surrogate(x_g: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Distribution-matching loss (Yin et al. 2024): d/dx_g of the per-sample sum is
    (fake - real) / sum_d |x_g - real|, i.e. `dmd_gradient` / D."""
    return _surrogate(x_g, dmd_gradient(x_g, real, fake))


def vsd_surrogate(
    x_g: torch.Tensor, eps_real: torch.Tensor, eps_fake: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Variational score distillation (ProlificDreamer / SwiftBrush): the update direction on x_g is
    weight * (eps_real - eps_fake) per sample (`weight` (B,) already holds w(t) d x_t / d x_g)."""
    with torch.no_grad():
        grad = _rows(weight, x_g) * (eps_real - eps_fake)
    return _surrogate(x_g, grad)


def sid_loss(x_g: torch.Tensor, real: torch.Tensor, fake: torch.Tensor, alpha: float) -> torch.Tensor:
    """Score identity distillation's generator loss (Zhou et al. 2024) per sample:
    [(1 - alpha) mean_d (real - fake)^2 + mean_d (real - fake)(fake - x_g)] / mean_d |x_g - real|,
    the normaliser detached (as in the paper's code). Zero, with zero gradient, when the fake score
    equals the real one as a function of x_g."""
    scale = _row_mean((x_g - real).abs()).detach().clamp_min(MIN_SCALE)
    diff = real - fake
    return ((1 - alpha) * _row_mean(diff**2) + _row_mean(diff * (fake - x_g))) / scale


def _logit(v: torch.Tensor) -> torch.Tensor:
    """One logit per sample: (B,) as is, a (B, ...) patch map averaged."""
    return v.reshape(v.shape[0], -1).mean(1)


def gan_generator_loss(logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss softplus(-D(fake)) per sample."""
    return torch.nn.functional.softplus(-_logit(logits))


def gan_critic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's logistic loss softplus(-D(real)) + softplus(D(fake)) per sample pair."""
    sp = torch.nn.functional.softplus
    return sp(-_logit(real_logits)) + sp(_logit(fake_logits))
