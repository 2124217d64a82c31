"""A small zoo of image/flat classifiers that record how they were built.

Every zoo model keeps its constructor arguments in `.config` ({"arch", "in_shape", "classes",
"options"}), so an exported state_dict plus that dict (config.json) rebuilds the same network through
`build_model`. Submodules have stable, readable names (`layers.0`, `block1`, `layer2`, `blocks.3.attn`)
because feature-distillation methods address them by dotted path.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _config(arch: str, in_shape: Sequence[int], classes: int, **options: Any) -> dict[str, Any]:
    return {"arch": arch, "in_shape": [int(s) for s in in_shape], "classes": int(classes), "options": options}


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{key} must be >= 1 (got {value})")


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = (int(s) for s in image_size)
    return h, w


def _size_option(h: int, w: int) -> int | list[int]:
    """Square images record one int (the common case); others [H, W], both JSON-friendly."""
    return h if h == w else [h, w]


class MLP(nn.Module):
    """Flattens its input; hidden layers are `layers.<i>` (Linear + ReLU + Dropout), then `head`."""

    def __init__(
        self, in_features: int, classes: int, hidden: Sequence[int] = (256, 128), dropout: float = 0.0
    ) -> None:
        super().__init__()
        _check_positive(
            in_features=in_features, classes=classes, **{f"hidden[{i}]": h for i, h in enumerate(hidden)}
        )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (got {dropout})")
        self.config = _config(
            "mlp", [in_features], classes, hidden=[int(h) for h in hidden], dropout=float(dropout)
        )
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers.append(nn.Sequential(nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)))
            width = h
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = layer(x)
        out: torch.Tensor = self.head(x)
        return out


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallCNN(nn.Module):
    """`stem`, `block1`, `block2` (conv+BN+ReLU, each halving the image while it stays >= 2 px), `pool`,
    `head`. `image_size` decides where to downsample, so 8x8 digits and 32x32 images both fit."""

    def __init__(
        self, in_channels: int, classes: int, width: int = 32, image_size: int | Sequence[int] = 8
    ) -> None:
        super().__init__()
        h, w = _hw(image_size)
        _check_positive(in_channels=in_channels, classes=classes, width=width, image_size=min(h, w))
        self.config = _config("cnn", [in_channels, h, w], classes, width=int(width))
        self.stem = _conv_bn(in_channels, width)
        size = min(h, w)
        blocks = []
        for cin, cout in ((width, width * 2), (width * 2, width * 4)):
            down = size >= 4
            size = size // 2 if down else size
            block = _conv_bn(cin, cout)
            if down:
                block.append(nn.MaxPool2d(2))
            blocks.append(block)
        self.block1, self.block2 = blocks
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.pool(self.block2(self.block1(self.stem(x)))))
        return out


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetish(nn.Module):
    """CIFAR-style ResNet: `stem`, `layer1..3` (widths w, 2w, 4w; stride 2 at stages 2 and 3), `pool`,
    `head`. `blocks` gives the basic blocks per stage."""

    def __init__(
        self,
        in_channels: int,
        classes: int,
        width: int = 16,
        blocks: Sequence[int] = (1, 1, 1),
        image_size: int | Sequence[int] = 32,
    ) -> None:
        super().__init__()
        if len(blocks) != 3:
            raise ValueError(f"blocks must list 3 stage depths (got {list(blocks)})")
        h, w = _hw(image_size)
        _check_positive(
            in_channels=in_channels,
            classes=classes,
            width=width,
            **{f"blocks[{i}]": b for i, b in enumerate(blocks)},
        )
        self.config = _config(
            "resnet", [in_channels, h, w], classes, width=int(width), blocks=[int(b) for b in blocks]
        )
        self.stem = _conv_bn(in_channels, width)
        stages = []
        cin = width
        for i, depth in enumerate(blocks):
            cout = width * 2**i
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(cin, cout, stride)] + [
                BasicBlock(cout, cout, 1) for _ in range(int(depth) - 1)
            ]
            stages.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        out: torch.Tensor = self.head(self.pool(x))
        return out


class Attention(nn.Module):
    """Multi-head self-attention over torch's fused scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        result: torch.Tensor = self.proj(out.transpose(1, 2).reshape(b, t, d))
        return result


class Block(nn.Module):
    """Pre-norm transformer block; `.attn` and `.mlp` are hookable on their own."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = max(1, int(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """`patch_embed` (strided conv), a cls token, learned positions, `blocks.<i>`, `norm`, `head` on the
    cls token. Small enough to train on 8x8 digits with patch 2 (16 tokens + cls)."""

    def __init__(
        self,
        in_channels: int,
        classes: int,
        image_size: int | Sequence[int] = 8,
        patch: int = 2,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2,
    ) -> None:
        super().__init__()
        h, w = _hw(image_size)
        _check_positive(
            in_channels=in_channels, classes=classes, patch=patch, dim=dim, depth=depth, heads=heads
        )
        if h % patch or w % patch:
            raise ValueError(f"image size {h}x{w} is not divisible by patch {patch}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0 (got {mlp_ratio})")
        self.config = _config(
            "vit", [in_channels, h, w], classes, patch=int(patch), dim=int(dim), depth=int(depth),
            heads=int(heads), mlp_ratio=float(mlp_ratio),
        )  # fmt: skip
        tokens = (h // patch) * (w // patch)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.head(self.norm(x)[:, 0])
        return out


ARCHITECTURES: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": SmallCNN, "resnet": ResNetish, "vit": TinyViT}

# Constructor arguments that come from the data's shape, never from options.
_DERIVED = {"in_features", "in_channels", "classes", "image_size"}
_TUPLES = {"hidden", "blocks"}


def known_options(arch: str) -> list[str]:
    """The option names `build_model` accepts for a zoo architecture (constructor args not set by data)."""
    params = inspect.signature(ARCHITECTURES[arch].__init__).parameters
    return sorted(p for p in params if p not in _DERIVED and p != "self")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _build_timm(name: str, in_shape: tuple[int, ...], classes: int, options: dict[str, Any]) -> nn.Module:
    try:
        timm = importlib.import_module("timm")
    except ImportError as exc:
        raise ValueError(
            f"architecture 'timm:{name}' needs timm, which is not installed ({_first_line(exc)})"
        ) from None
    except Exception as exc:  # a broken torchvision underneath timm raises all sorts
        raise ValueError(
            f"architecture 'timm:{name}' needs timm, which does not import ({_first_line(exc)})"
        ) from None
    if len(in_shape) != 3:
        raise ValueError(
            f"architecture 'timm:{name}' needs image inputs (C, H, W); got shape {tuple(in_shape)}"
        )
    if "pretrained" in options or "num_classes" in options or "in_chans" in options:
        raise ValueError("options pretrained, num_classes and in_chans are set by distill for timm models")
    try:
        model: nn.Module = timm.create_model(
            name, pretrained=False, num_classes=classes, in_chans=in_shape[0], **options
        )
    except Exception as exc:
        raise ValueError(f"timm could not create '{name}': {_first_line(exc)}") from None
    model.distill_config = _config(f"timm:{name}", in_shape, classes, **options)  # type: ignore[assignment]
    return model


def build_model(
    arch: str, in_shape: Sequence[int], classes: int, options: Mapping[str, Any] | None = None
) -> nn.Module:
    """A fresh model for inputs shaped `in_shape` (per sample: (C, H, W) or (F,)); errors are one line."""
    in_shape = tuple(int(s) for s in in_shape)
    opts = dict(options or {})
    if arch.startswith("timm:"):
        return _build_timm(arch[len("timm:") :], in_shape, classes, opts)
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture '{arch}' (known: {', '.join(sorted(ARCHITECTURES))}, timm:<name>)"
        )
    known = known_options(arch)
    for key in opts:
        if key not in known:
            raise ValueError(f"unknown option '{key}' for {arch} (known: {', '.join(known)})")
    for key in _TUPLES & opts.keys():
        opts[key] = tuple(opts[key])
    if not in_shape or any(s < 1 for s in in_shape):
        raise ValueError(f"input shape must be non-empty and positive (got {in_shape})")
    if arch == "mlp":
        model = MLP(math.prod(in_shape), classes, **opts)
        model.config["in_shape"] = list(in_shape)  # rebuild with the data's shape, not the flat one
        return model
    if len(in_shape) != 3:
        raise ValueError(f"architecture '{arch}' needs image inputs (C, H, W); got shape {in_shape}")
    c, h, w = in_shape
    return ARCHITECTURES[arch](c, classes, image_size=_size_option(h, w), **opts)


def model_config(model: nn.Module) -> dict[str, Any]:
    """The dict (JSON-able) that `model_from_config` turns back into the same architecture."""
    for attr in ("distill_config", "config"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and "arch" in cfg:
            return copy.deepcopy(cfg)
    raise ValueError(f"{type(model).__name__} was not built by the classifier zoo (no config to rebuild it)")


def model_from_config(config: Mapping[str, Any]) -> nn.Module:
    """Rebuild an (untrained) model from `model_config`'s dict; load its state_dict afterwards."""
    try:
        arch, in_shape, classes = config["arch"], config["in_shape"], config["classes"]
    except KeyError as exc:
        raise ValueError(f"model config lacks '{exc.args[0]}'") from None
    return build_model(arch, tuple(in_shape), int(classes), config.get("options") or {})


def module_names(model: nn.Module) -> list[str]:
    """Dotted names of every submodule (the root excluded), the addresses feature hooks accept."""
    return [name for name, _ in model.named_modules() if name]


def find_module(model: nn.Module, path: str, role: str = "model") -> nn.Module:
    """The submodule at `path`; a miss names the nearest real paths so a typo is fixed in one go."""
    modules = dict(model.named_modules())
    if path and path in modules:
        return modules[path]
    names = module_names(model)
    nearest = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
    if not nearest:
        prefix = path.split(".")[0]
        while prefix and not nearest:
            nearest = [n for n in names if n.startswith(prefix)][:5]
            prefix = prefix[:-1]
    if not nearest:
        nearest = [n for n in names if "." not in n][:5]
    shown = ", ".join(sorted(nearest)) or "none"
    raise ValueError(f"module '{path}' not found in the {role} (nearest: {shown})")
