"""The family's own denoisers, written as diffusers models (ModelMixin + ConfigMixin) so teachers and
students save and load as diffusers folders: an MLP for 2-D toys and a small conditional U-Net for 8x8 /
16x16 digits. Both read the noise level, an optional class label (index `classes` is the null label of
classifier-free guidance) and an optional guidance scale (for guidance-distilled students; its embedding
starts at zero, so a student copied from its teacher starts as the teacher)."""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from distill.diffusion.paths import NoisePath


def sinusoidal(values: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    half = dim // 2
    dtype = values.dtype if values.is_floating_point() else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=dtype) / half)
    args = values.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _Conditioning(nn.Module):
    """Time, class and guidance-scale embeddings summed into one vector."""

    def __init__(self, dim: int, classes: int, guidance: bool) -> None:
        super().__init__()
        self.dim = dim
        self.time = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(classes + 1, dim) if classes > 0 else None
        self.guidance: nn.Sequential | None = None
        if guidance:
            last = nn.Linear(dim, dim)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.guidance = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), last)

    def forward(
        self, timestep: torch.Tensor, labels: torch.Tensor | None, guidance: torch.Tensor | None, n: int
    ) -> torch.Tensor:
        if timestep.ndim == 0:
            timestep = timestep.expand(n)
        emb = self.time(sinusoidal(timestep, self.dim))
        if self.label is not None:
            if labels is None:  # unconditional: the null label
                labels = torch.full((n,), self.label.num_embeddings - 1, device=emb.device, dtype=torch.long)
            emb = emb + self.label(labels)
        if self.guidance is not None and guidance is not None:
            if guidance.ndim == 0:
                guidance = guidance.expand(n)
            emb = emb + self.guidance(sinusoidal(guidance * 100.0, self.dim))
        return emb


class ToyMLP(ModelMixin, ConfigMixin):  # type: ignore[misc]
    @register_to_config
    def __init__(
        self, dim: int = 2, hidden: int = 256, layers: int = 4, classes: int = 0, guidance_embed: bool = False
    ) -> None:
        super().__init__()
        self.cond = _Conditioning(hidden, classes, guidance_embed)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
            )
            for _ in range(layers)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.cond(timestep, class_labels, guidance, sample.shape[0])
        h = self.inp(sample)
        for block in self.blocks:
            h = h + block(h + emb)
        out: torch.Tensor = self.out(h)
        return out


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int) -> None:
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb, 2 * cout)
        self.n2, self.c2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.c1(nn.functional.silu(self.n1(x)))
        scale, shift = self.film(nn.functional.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.n2(h) * (1 + scale) + shift
        h = self.c2(nn.functional.silu(h))
        return self.skip(x) + h


class DigitsUNet(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """Two resolutions (full, half), FiLM-conditioned residual blocks, a skip connection across."""

    @register_to_config
    def __init__(
        self, in_channels: int = 1, width: int = 32, classes: int = 10, guidance_embed: bool = False
    ) -> None:
        super().__init__()
        emb = 4 * width
        self.cond = _Conditioning(emb, classes, guidance_embed)
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.down1 = _ResBlock(width, width, emb)
        self.pool = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid1 = _ResBlock(2 * width, 2 * width, emb)
        self.mid2 = _ResBlock(2 * width, 2 * width, emb)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.up1 = _ResBlock(3 * width, width, emb)
        self.conv_out = nn.Sequential(
            nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, in_channels, 3, padding=1)
        )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.cond(timestep, class_labels, guidance, sample.shape[0])
        h0 = self.down1(self.conv_in(sample), emb)
        h = self.mid2(self.mid1(self.pool(h0), emb), emb)
        h = self.up1(torch.cat([self.up(h), h0], dim=1), emb)
        out: torch.Tensor = self.conv_out(h)
        return out


class Denoiser(nn.Module):
    """A network on a noise path. `forward` is the raw output (what the engine wraps and differentiates);
    `x0` the clean-sample estimate every sampler and distillation target is written against."""

    def __init__(self, net: nn.Module, path: NoisePath) -> None:
        super().__init__()
        self.net, self.path = net, path

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        inp, time = self.path.net_input(x, t)
        out: torch.Tensor = self.net(inp, time, labels, guidance)
        return out

    def x0(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return x0_of(self, self.path, x, t, labels, guidance)


def x0_of(
    module: nn.Module,
    path: NoisePath,
    x: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None = None,
    guidance: torch.Tensor | None = None,
) -> torch.Tensor:
    """x0 through a (possibly DDP-wrapped) Denoiser: call the wrapper so gradients synchronise."""
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return path.x0(module(x, t, labels, guidance), x, t)


def guided_x0(
    den: Denoiser, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Classifier-free guidance on x0: uncond + scale (cond - uncond); scale 1 is the conditional model."""
    cond = den.x0(x, t, labels)
    if labels is None or scale == 1.0:
        return cond
    uncond = den.x0(x, t, None)
    return uncond + scale * (cond - uncond)
