"""Batch augmentations in plain torch, every random draw taken from an explicit `torch.Generator`.

Draws happen on the CPU generator and are then moved to the batch's device, so a seed gives the same
augmented batch on any device and KD methods comparing teacher and student see identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def _check_images(x: torch.Tensor, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what} needs image batches (N, C, H, W); got shape {tuple(x.shape)}")


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=gen, device=gen.device)


def _beta(alpha: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """n draws of Beta(alpha, alpha); torch's Beta takes no generator, so numpy is seeded from `gen`."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n)).float()


def _check_alpha(alpha: float, what: str) -> None:
    if alpha < 0:
        raise ValueError(f"{what} alpha must be >= 0 (got {alpha})")


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` on each side, then crop each sample back to H x W at its own random offset."""
    _check_images(x, "random_crop")
    if padding < 0:
        raise ValueError(f"crop padding must be >= 0 (got {padding})")
    if padding == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=gen, device=gen.device).to(x.device)
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each sample left-right with probability p."""
    _check_images(x, "random_flip")
    flip = (_rand(gen, x.shape[0]) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _mix_targets(y: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    lam = lam.to(y.device, y.dtype)[:, None]
    return lam * y + (1 - lam) * y[perm]


def mixup(
    x: torch.Tensor, y_onehot: torch.Tensor, alpha: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each sample with a random partner by lam ~ Beta(alpha, alpha) (one per sample); targets are
    blended by the same lam, so rows that summed to 1 still do. alpha 0 leaves the batch as is."""
    _check_alpha(alpha, "mixup")
    if alpha == 0 or len(x) == 0:
        return x, y_onehot
    perm = torch.randperm(len(x), generator=gen, device=gen.device).to(x.device)
    lam = _beta(alpha, len(x), gen)
    shape = (len(x),) + (1,) * (x.ndim - 1)
    lam_x = lam.to(x.device, x.dtype).view(shape)
    return lam_x * x + (1 - lam_x) * x[perm], _mix_targets(y_onehot, lam, perm)


def cutmix(
    x: torch.Tensor, y_onehot: torch.Tensor, alpha: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a random box from a partner into each sample (box area ~ 1 - Beta(alpha, alpha)); targets are
    mixed by the box's actual area after clipping at the border. alpha 0 leaves the batch as is."""
    _check_images(x, "cutmix")
    _check_alpha(alpha, "cutmix")
    if alpha == 0 or len(x) == 0:
        return x, y_onehot
    n, _, h, w = x.shape
    perm = torch.randperm(n, generator=gen, device=gen.device).to(x.device)
    cut = torch.sqrt(1 - _beta(alpha, n, gen))
    centre = _rand(gen, 2, n).cpu()
    ch, cw = centre[0] * h, centre[1] * w
    top = (ch - cut * h / 2).round().clamp(0, h).long()
    bottom = (ch + cut * h / 2).round().clamp(0, h).long()
    left = (cw - cut * w / 2).round().clamp(0, w).long()
    right = (cw + cut * w / 2).round().clamp(0, w).long()
    lam = 1 - ((bottom - top) * (right - left)).float() / (h * w)
    r, c = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    box = (
        (r >= top[:, None, None])
        & (r < bottom[:, None, None])
        & (c >= left[:, None, None])
        & (c < right[:, None, None])
    )
    box = box[:, None].to(x.device)
    return torch.where(box, x[perm], x), _mix_targets(y_onehot, lam, perm)


@dataclass
class Augment:
    """The augmentations a recipe turns on; calling it applies crop, flip, then mixup or cutmix (one of
    the two, chosen per batch, when both are on). All off is the identity."""

    crop_padding: int = 0
    flip: bool = False
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0 (got {self.crop_padding})")
        _check_alpha(self.mixup_alpha, "mixup")
        _check_alpha(self.cutmix_alpha, "cutmix")

    @property
    def enabled(self) -> bool:
        return bool(self.crop_padding or self.flip or self.mixup_alpha or self.cutmix_alpha)

    @property
    def mixes(self) -> bool:
        """Whether targets come back soft (mixed), so a loss must accept probability targets."""
        return bool(self.mixup_alpha or self.cutmix_alpha)

    def __call__(
        self, x: torch.Tensor, y_onehot: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.crop_padding:
            x = random_crop(x, self.crop_padding, gen)
        if self.flip:
            x = random_flip(x, gen)
        use_mixup, use_cutmix = self.mixup_alpha > 0, self.cutmix_alpha > 0
        if use_mixup and use_cutmix:
            use_cutmix = bool(_rand(gen, 1).item() < 0.5)
            use_mixup = not use_cutmix
        if use_cutmix:
            return cutmix(x, y_onehot, self.cutmix_alpha, gen)
        if use_mixup:
            return mixup(x, y_onehot, self.mixup_alpha, gen)
        return x, y_onehot
