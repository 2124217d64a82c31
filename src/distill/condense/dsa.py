"""Differentiable Siamese Augmentation (Zhao & Bilen 2021, "Dataset Condensation with Differentiable
Siamese Augmentation").

Why: synthetic images are few, so a matching objective overfits to them unless both sides see augmented
views -- and the *same* augmentation on the real and the synthetic batch (siamese), otherwise the
matching signal mostly measures the difference between two random transforms. Every transform here is
differentiable w.r.t. the images (affine grids, gathers, masks, affine colour maps), so the matching loss
reaches the synthetic pixels through it.

Parameters are sampled once (`DSAParams.sample`, from a `torch.Generator` only, never the global RNG)
and applied with `apply_dsa` to as many batches as needed. Ranges follow the authors' defaults:
scale 1.2, rotate 15 degrees, crop (translation) 1/8 of the side, cutout half the side, brightness 1.0,
saturation 2.0, contrast 0.5, flip probability 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DSA_OPS", "DSAParams", "apply_dsa", "parse_strategy"]

DSA_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """ "color_crop_flip" -> ("color", "crop", "flip"); "" or "none" -> (); unknown names are errors."""
    if not strategy or strategy.lower() == "none":
        return ()
    ops = tuple(strategy.split("_"))
    unknown = [op for op in ops if op not in DSA_OPS]
    if unknown:
        raise ValueError(f"unknown DSA op(s) {unknown} in '{strategy}' (known: {', '.join(DSA_OPS)})")
    return ops


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def _randint(n: int, low: int, high: int, gen: torch.Generator) -> Tensor:
    """Integers in [low, high] (both ends included)."""
    return torch.randint(low, high + 1, (n,), generator=gen)


@dataclass(frozen=True)
class DSAParams:
    """One draw of augmentation parameters: ``rows`` rows (1 when shared by the whole batch).

    ``ops`` lists the transforms to apply, in order. Angles are radians, scales/colour values are factors
    or offsets, ``translate`` is (dy, dx) pixels, ``cutout`` is the (cy, cx) centre of a ``cutout_size``
    square. Fields of ops that are not in ``ops`` are None.
    """

    ops: tuple[str, ...]
    rows: int
    image_size: tuple[int, int]
    scale: Tensor | None = None  # (rows, 2): (sy, sx)
    rotate: Tensor | None = None  # (rows,)
    flip: Tensor | None = None  # (rows,) bool
    brightness: Tensor | None = None  # (rows,) additive
    saturation: Tensor | None = None  # (rows,) factor
    contrast: Tensor | None = None  # (rows,) factor
    translate: Tensor | None = None  # (rows, 2) int64
    cutout: Tensor | None = None  # (rows, 2) int64
    cutout_size: tuple[int, int] = field(default=(0, 0))

    @classmethod
    def sample(
        cls,
        strategy: str,
        batch_size: int,
        image_size: tuple[int, int],
        generator: torch.Generator,
        batch_shared: bool = False,
        one_of: bool = True,
        scale: float = 1.2,
        rotate_deg: float = 15.0,
        crop: float = 0.125,
        cutout: float = 0.5,
        brightness: float = 1.0,
        saturation: float = 2.0,
        contrast: float = 0.5,
        flip_p: float = 0.5,
    ) -> DSAParams:
        """Draw parameters for a batch of ``batch_size`` images of ``image_size`` (H, W).

        ``batch_shared=True`` draws one row for the whole batch (the authors' siamese setting, which also
        lets one draw serve a real and a synthetic batch of different sizes); otherwise one row per
        sample, and the batches it is applied to must have exactly ``batch_size`` images.
        ``one_of=True`` applies a single op chosen uniformly from the strategy per draw, as the authors'
        code does by default (stacking every op distorts small images too much); False applies all.
        """
        ops = parse_strategy(strategy)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        h, w = (int(s) for s in image_size)
        if one_of and ops:
            ops = (ops[int(torch.randint(len(ops), (1,), generator=generator))],)
        n = 1 if batch_shared else batch_size
        values: dict[str, Tensor] = {}
        cut = (0, 0)
        for op in ops:
            if op == "scale":
                values["scale"] = torch.stack(
                    [_uniform(n, 1 / scale, scale, generator), _uniform(n, 1 / scale, scale, generator)], 1
                )
            elif op == "rotate":
                limit = math.radians(rotate_deg)
                values["rotate"] = _uniform(n, -limit, limit, generator)
            elif op == "flip":
                values["flip"] = torch.rand(n, generator=generator) < flip_p
            elif op == "color":
                values["brightness"] = _uniform(n, -brightness / 2, brightness / 2, generator)
                values["saturation"] = _uniform(n, 0.0, saturation, generator)
                values["contrast"] = _uniform(n, contrast, contrast + 1.0, generator)
            elif op == "crop":
                sy, sx = int(h * crop + 0.5), int(w * crop + 0.5)
                values["translate"] = torch.stack(
                    [_randint(n, -sy, sy, generator), _randint(n, -sx, sx, generator)], 1
                )
            elif op == "cutout":
                cut = (int(h * cutout + 0.5), int(w * cutout + 0.5))
                values["cutout"] = torch.stack(
                    [_randint(n, 0, h - cut[0] % 2, generator), _randint(n, 0, w - cut[1] % 2, generator)], 1
                )
        return cls(ops=ops, rows=n, image_size=(h, w), cutout_size=cut, **values)


def _rows(t: Tensor, n: int, like: Tensor) -> Tensor:
    t = t.to(like.device)
    if t.is_floating_point():
        t = t.to(like.dtype)
    return t.expand(n, *t.shape[1:]) if t.shape[0] == 1 else t


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _scale(x: Tensor, s: Tensor) -> Tensor:
    theta = x.new_zeros(x.shape[0], 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = s[:, 1], s[:, 0]
    return _affine(x, theta)


def _rotate(x: Tensor, angle: Tensor) -> Tensor:
    cos, sin = angle.cos(), angle.sin()
    theta = x.new_zeros(x.shape[0], 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    return _affine(x, theta)


def _translate(x: Tensor, shift: Tensor) -> Tensor:
    """out[..., i, j] = x[..., i + dy, j + dx], zeros outside: a gather, so gradients reach x exactly."""
    n, _, h, w = x.shape
    pad = int(shift.abs().max()) if shift.numel() else 0
    if pad == 0:
        return x
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = torch.arange(h, device=x.device)[None, :] + shift[:, :1] + pad  # (n, h)
    cols = torch.arange(w, device=x.device)[None, :] + shift[:, 1:] + pad  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return xp[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _cutout(x: Tensor, centre: Tensor, size: tuple[int, int]) -> Tensor:
    _, _, h, w = x.shape
    top = centre[:, :1] - size[0] // 2  # (n, 1)
    left = centre[:, 1:] - size[1] // 2
    r = torch.arange(h, device=x.device)[None, :]
    c = torch.arange(w, device=x.device)[None, :]
    in_rows = (r >= top) & (r < top + size[0])  # (n, h)
    in_cols = (c >= left) & (c < left + size[1])  # (n, w)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


def apply_dsa(x: Tensor, params: DSAParams) -> Tensor:
    """Apply one parameter draw to a batch (N, C, H, W); differentiable w.r.t. ``x``.

    Applying the same ``params`` to the real and the synthetic batch is what makes it siamese.
    """
    if x.dim() != 4:
        raise ValueError(f"DSA needs image batches (N, C, H, W) (got shape {tuple(x.shape)})")
    if tuple(x.shape[2:]) != params.image_size:
        raise ValueError(f"images are {tuple(x.shape[2:])} but the DSA draw was for {params.image_size}")
    n = x.shape[0]
    if params.rows not in (1, n):
        raise ValueError(
            f"DSA draw has {params.rows} per-sample rows but the batch has {n} images "
            "(sample with batch_shared=True to reuse one draw across batch sizes)"
        )

    def get(t: Tensor | None) -> Tensor:
        assert t is not None
        return _rows(t, n, x)

    for op in params.ops:
        if op == "scale":
            x = _scale(x, get(params.scale))
        elif op == "rotate":
            x = _rotate(x, get(params.rotate))
        elif op == "flip":
            x = torch.where(get(params.flip)[:, None, None, None], x.flip(3), x)
        elif op == "color":
            x = x + get(params.brightness)[:, None, None, None]
            mean = x.mean(1, keepdim=True)
            x = (x - mean) * get(params.saturation)[:, None, None, None] + mean
            mean = x.mean((1, 2, 3), keepdim=True)
            x = (x - mean) * get(params.contrast)[:, None, None, None] + mean
        elif op == "crop":
            x = _translate(x, get(params.translate))
        elif op == "cutout":
            x = _cutout(x, get(params.cutout), params.cutout_size)
    return x
