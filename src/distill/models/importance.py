"""Activation-based importance of heads, MLP channels, embedding channels and whole blocks of a
Llama-shaped causal LM, measured on a few calibration batches.

Width pruning (Minitron) keeps what the activations say matters; depth pruning (ShortGPT) drops the blocks
that change their input least. Both need the scores from real text, and both need a seeded random control
so that a report can show the ranking beats chance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from distill.errors import RecipeError
from distill.models.student import decoder_layers

_PROJ = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
_NORMS = ("input_layernorm", "post_attention_layernorm")
# Every parameter a supported decoder layer may hold: anything else (Gemma's extra norms, MoE experts)
# would be silently left unpruned or mis-sliced, so such models are refused.
_LAYER_PARAMS = (
    {
        f"{part}.{proj}.{kind}"
        for part, projs in _PROJ.items()
        for proj in projs
        for kind in ("weight", "bias")
    }
    | {f"{norm}.{kind}" for norm in _NORMS for kind in ("weight", "bias")}
    | {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}  # Qwen3: per head_dim, untouched by pruning
)


@dataclass
class Importance:
    """Per-structure scores (higher = keep). All on the CPU, float64."""

    heads: Tensor  # (L, num_attention_heads): mean squared o_proj input, per query head's slice
    channels: Tensor  # (L, intermediate_size): mean squared down_proj input, per channel
    embedding: Tensor  # (hidden_size,): mean squared norm outputs, summed over every norm of the model
    blocks: Tensor  # (L,): mean 1 - cos(block input, block output) (ShortGPT's block importance)


@dataclass(frozen=True)
class Dims:
    """The teacher's sizes that pruning and calibration rely on, read from its modules and config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int


def llama_dims(model: PreTrainedModel) -> Dims:
    """Check that `model` is Llama-shaped (q/k/v/o, gate/up/down, two norms per layer, final norm, token
    embedding) with uniform sizes, and return them; anything else cannot be width-pruned by slicing."""
    name = type(model).__name__
    config = model.config
    body = model.base_model
    try:
        layers = decoder_layers(model)
    except RecipeError:
        raise RecipeError(
            f"student.prune.width: {name} has no .model.layers; only Llama-shaped models are supported"
        ) from None
    embed = model.get_input_embeddings()
    if not isinstance(embed, nn.Embedding) or not isinstance(getattr(body, "norm", None), nn.Module):
        raise RecipeError(
            f"student.prune.width: {name} has no embed_tokens/norm pair; only Llama-shaped models are supported"
        )
    try:
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        dims = Dims(
            len(layers), int(config.hidden_size), int(config.intermediate_size), heads, kv_heads, head_dim
        )
    except (AttributeError, TypeError, ValueError):
        raise RecipeError(f"student.prune.width: {name}'s config lacks Llama's size fields") from None
    expected = {
        "self_attn.q_proj.weight": (heads * head_dim, dims.hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, dims.hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, dims.hidden),
        "self_attn.o_proj.weight": (dims.hidden, heads * head_dim),
        "mlp.gate_proj.weight": (dims.intermediate, dims.hidden),
        "mlp.up_proj.weight": (dims.intermediate, dims.hidden),
        "mlp.down_proj.weight": (dims.hidden, dims.intermediate),
    }
    for i, layer in enumerate(layers):
        params = {n: tuple(p.shape) for n, p in layer.named_parameters()}
        odd = sorted(set(params) - _LAYER_PARAMS)
        wrong = [k for k, shape in expected.items() if params.get(k) != shape]
        if odd or wrong or not all(isinstance(getattr(layer, n, None), nn.Module) for n in _NORMS):
            what = f"unexpected {odd[:2]}" if odd else f"{wrong[:2]} missing or not of Llama's shape"
            raise RecipeError(
                f"student.prune.width: layer {i} of {name}: {what}; only Llama-shaped models are supported"
            )
    if embed.weight.shape[1] != dims.hidden:
        raise RecipeError(f"student.prune.width: {name}'s embedding is not hidden_size wide")
    return dims


def _part(layer: nn.Module, path: str) -> nn.Module:
    module: nn.Module = layer.get_submodule(path)
    return module


def final_norm(model: PreTrainedModel) -> nn.Module:
    """The norm after the last block (`model.norm`)."""
    return _part(model.base_model, "norm")


class _Stats:
    """Running sums over real tokens; `mask` is the current batch's (B*T,) bool of non-padding tokens."""

    def __init__(self, dims: Dims, device: torch.device) -> None:
        f64 = torch.float64
        self.dims = dims
        self.heads = torch.zeros(dims.layers, dims.heads, dtype=f64, device=device)
        self.channels = torch.zeros(dims.layers, dims.intermediate, dtype=f64, device=device)
        self.embedding = torch.zeros(dims.hidden, dtype=f64, device=device)
        self.blocks = torch.zeros(dims.layers, dtype=f64, device=device)
        self.tokens = 0
        self.mask = torch.zeros(0, dtype=torch.bool, device=device)

    def real(self, x: Tensor) -> Tensor:
        """Rows of (B, T, D) activations at real tokens, as (N, D) float64."""
        return x.reshape(-1, x.shape[-1])[self.mask].double()

    def on_o_proj(self, i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = self.real(args[0]).pow(2).reshape(-1, self.dims.heads, self.dims.head_dim)
            self.heads[i] += x.mean(dim=2).sum(dim=0)

        return hook

    def on_down_proj(self, i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            self.channels[i] += self.real(args[0]).pow(2).sum(dim=0)

        return hook

    def on_norm(self, _m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
        self.embedding += self.real(out[0] if isinstance(out, tuple) else out).pow(2).sum(dim=0)

    def on_block(self, i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            before = self.real(args[0] if args else kwargs["hidden_states"])
            after = self.real(out[0] if isinstance(out, tuple) else out)
            self.blocks[i] += (1 - torch.nn.functional.cosine_similarity(before, after, dim=-1)).sum()

        return hook


@torch.no_grad()
def calibrate(model: PreTrainedModel, batches: Iterable[tuple[Tensor, Tensor]]) -> Importance:
    """Forward hooks over calibration batches of (input_ids, attention_mask); padding excluded from every
    statistic. Positions count real tokens only, so left- and right-padded batches score alike."""
    dims = llama_dims(model)
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    stats = _Stats(dims, device)
    handles = [final_norm(model).register_forward_hook(stats.on_norm)]
    for i, layer in enumerate(layers):
        handles.append(_part(layer, "self_attn.o_proj").register_forward_pre_hook(stats.on_o_proj(i)))
        handles.append(_part(layer, "mlp.down_proj").register_forward_pre_hook(stats.on_down_proj(i)))
        handles.extend(_part(layer, n).register_forward_hook(stats.on_norm) for n in _NORMS)
        handles.append(layer.register_forward_hook(stats.on_block(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        for input_ids, attention_mask in batches:
            ids, mask = input_ids.to(device), attention_mask.to(device)
            stats.mask = mask.reshape(-1).bool()
            stats.tokens += int(stats.mask.sum())
            positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
            model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if stats.tokens == 0:
        raise RecipeError("student.prune.calibration: no real (non-padding) tokens to measure importance on")
    n = stats.tokens
    return Importance(
        heads=(stats.heads / n).cpu(),
        channels=(stats.channels / n).cpu(),
        embedding=(stats.embedding / n).cpu(),
        blocks=(stats.blocks / n).cpu(),
    )


def random_importance(model: PreTrainedModel, seed: int) -> Importance:
    """Same shapes, random scores from a seeded torch.Generator: the control that importance ranking must beat."""
    dims = llama_dims(model)
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    return Importance(
        heads=draw(dims.layers, dims.heads),
        channels=draw(dims.layers, dims.intermediate),
        embedding=draw(dims.hidden),
        blocks=draw(dims.layers),
    )


def top_indices(scores: Tensor, keep: int) -> Tensor:
    """Indices of the `keep` highest scores, in increasing index order (ties go to the lower index, so
    the choice is reproducible)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:keep].sort().values


def rank_blocks(importance: Importance, keep: int) -> list[int]:
    """The `keep` most important blocks, sorted by index."""
    total = int(importance.blocks.numel())
    if not 1 <= keep <= total:
        raise RecipeError(
            f"student.prune.keep_layers: {keep} is not between 1 and the teacher's {total} layers"
        )
    return [int(i) for i in top_indices(importance.blocks, keep)]
