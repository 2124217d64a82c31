"""Minitron-style structured pruning of a Llama-shaped causal LM: keep some blocks, and within them the
most important attention heads, MLP channels and embedding channels, by slicing the teacher's weights.

The result is a fresh, plain model of the teacher's class, so it saves and loads like any Hugging Face
model, and distillation then recovers what the pruning lost.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from distill.errors import RecipeError
from distill.models.config_facts import check_prune_fits
from distill.models.importance import Dims, Importance, final_norm, llama_dims, top_indices
from distill.models.loading import first_line, fresh_copy
from distill.models.student import decoder_layers

FIELD = "student.prune.width"


@dataclass(frozen=True)
class WidthTarget:
    """Sizes of the pruned model; None keeps the teacher's."""

    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None


@dataclass(frozen=True)
class _Sizes:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int


def _resolve(target: WidthTarget, dims: Dims) -> _Sizes:
    """Fill in the teacher's sizes and refuse what slicing cannot produce, naming the field. Without
    num_attention_heads, each kept key/value group keeps all its query heads."""
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        value = getattr(target, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RecipeError(f"{FIELD}.{name}: {value!r} must be a whole number of at least 1")
    group = dims.heads // dims.kv_heads
    kv = target.num_key_value_heads if target.num_key_value_heads is not None else dims.kv_heads
    heads = target.num_attention_heads if target.num_attention_heads is not None else kv * group
    hidden = target.hidden_size if target.hidden_size is not None else dims.hidden
    inter = target.intermediate_size if target.intermediate_size is not None else dims.intermediate
    sizes = {
        "hidden_size": (hidden, dims.hidden),
        "intermediate_size": (inter, dims.intermediate),
        "num_key_value_heads": (kv, dims.kv_heads),  # before heads, which may derive from it
        "num_attention_heads": (heads, dims.heads),
    }
    for name, (value, teacher) in sizes.items():
        if value > teacher:
            raise RecipeError(f"{FIELD}.{name}: {value} is larger than the teacher's {teacher}")
    if heads % kv:
        raise RecipeError(
            f"{FIELD}.num_attention_heads: {heads} is not a multiple of num_key_value_heads ({kv})"
        )
    if heads // kv > group:
        raise RecipeError(
            f"{FIELD}.num_attention_heads: {heads} heads over {kv} key/value groups is {heads // kv} per group, "
            f"more than the teacher's {group}"
        )
    return _Sizes(hidden, inter, heads, kv)


def _check_layers(keep_layers: list[int], total: int) -> list[int]:
    check_prune_fits(None, keep_layers, total)
    if not keep_layers:
        raise RecipeError("student.prune.layers: keeps no layers")
    if len(set(keep_layers)) != len(keep_layers):
        raise RecipeError(f"student.prune.layers: {keep_layers} lists a layer twice")
    return sorted(keep_layers)


def _check_importance(importance: Importance, dims: Dims) -> None:
    shapes = {
        "heads": (dims.layers, dims.heads),
        "channels": (dims.layers, dims.intermediate),
        "embedding": (dims.hidden,),
        "blocks": (dims.layers,),
    }
    for name, shape in shapes.items():
        got = tuple(getattr(importance, name).shape)
        if got != shape:
            raise ValueError(f"importance.{name} has shape {got}, the model needs {shape}")


def _pruned_config(model: PreTrainedModel, keep: list[int], sizes: _Sizes, head_dim: int) -> dict[str, Any]:
    """Config changes for the student, checked by the config class itself so that `from_pretrained` will
    accept the saved model (Llama still wants hidden_size divisible by the head count)."""
    changes: dict[str, Any] = {
        "num_hidden_layers": len(keep),
        "hidden_size": sizes.hidden,
        "intermediate_size": sizes.intermediate,
        "num_attention_heads": sizes.heads,
        "num_key_value_heads": sizes.kv_heads,
        "head_dim": head_dim,
    }
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == model.config.num_hidden_layers:
        changes["layer_types"] = [layer_types[i] for i in keep]
    config = copy.deepcopy(model.config)
    for key, value in changes.items():
        setattr(config, key, value)
    validate = getattr(config, "validate", None)
    if callable(validate):
        try:
            validate()
        except Exception as err:  # strict-dataclass validators raise several types; all mean "refused"
            text = " ".join(first_line(err).split())
            field = f"{FIELD}.hidden_size" if "hidden size" in text.lower() else FIELD
            raise RecipeError(
                f"{field}: {type(config).__name__} refuses hidden_size {sizes.hidden} with "
                f"{sizes.heads} attention heads ({text.rsplit(': ', 1)[-1]})"
            ) from None
    return changes


def _head_rows(scores: Tensor, sizes: _Sizes, dims: Dims) -> tuple[Tensor, Tensor]:
    """Kept query heads and kept key/value groups of one layer: the best groups by their heads' summed
    score, then the best heads inside each kept group (GQA keeps every query head with its own group)."""
    group = dims.heads // dims.kv_heads
    per_group = scores.reshape(dims.kv_heads, group)
    groups = top_indices(per_group.sum(dim=1), sizes.kv_heads)
    keep_per_group = sizes.heads // sizes.kv_heads
    heads = torch.cat([g * group + top_indices(per_group[g], keep_per_group) for g in groups.tolist()])
    return heads, groups


def _rows(units: Tensor, width: int) -> Tensor:
    """Weight rows of whole heads (or groups) `units`, each `width` rows wide."""
    return (units[:, None] * width + torch.arange(width)).reshape(-1)


class _Copier:
    """Copies sliced teacher tensors into the student, and remembers which student tensors it filled so
    that none is left with its random initialisation."""

    def __init__(self) -> None:
        self.filled: set[int] = set()

    def put(self, dst: nn.Module, src: nn.Module, rows: Tensor | None, cols: Tensor | None) -> None:
        """Copy `src`'s weight (rows, cols sliced; a bias follows the rows) into `dst`."""
        for name, target in dst.named_parameters(recurse=False):
            value = getattr(src, name).detach()
            if rows is not None:
                value = value.index_select(0, rows.to(value.device))
            if cols is not None and value.dim() == 2:
                value = value.index_select(1, cols.to(value.device))
            if value.shape != target.shape:
                raise RecipeError(
                    f"{FIELD}: {name} of {type(src).__name__} did not slice to the student's shape"
                )
            target.copy_(value)
            self.filled.add(id(target))


@torch.no_grad()
def prune_model(
    model: PreTrainedModel, keep_layers: list[int], target: WidthTarget, importance: Importance
) -> PreTrainedModel:
    """A fresh, plain model of the same class (saveable with save_pretrained, loadable with
    from_pretrained) keeping the blocks in keep_layers (in index order) and, within them, the most
    important heads / MLP channels / embedding channels. head_dim stays the teacher's. Weights are
    otherwise copied exactly."""
    dims = llama_dims(model)
    keep = _check_layers(list(keep_layers), dims.layers)
    sizes = _resolve(target, dims)
    _check_importance(importance, dims)
    student = fresh_copy(model, **_pruned_config(model, keep, sizes, dims.head_dim))
    emb = top_indices(importance.embedding, sizes.hidden)
    out = _Copier()
    out.put(student.get_input_embeddings(), model.get_input_embeddings(), None, emb)
    out.put(final_norm(student), final_norm(model), emb, None)
    head, teacher_head = student.get_output_embeddings(), model.get_output_embeddings()
    if head is not None and teacher_head is not None and id(head.weight) not in out.filled:
        out.put(head, teacher_head, None, emb)  # untied head: its columns are embedding channels
    for new, old in zip(decoder_layers(student), keep, strict=True):
        src = decoder_layers(model)[old]
        heads, groups = _head_rows(importance.heads[old], sizes, dims)
        q_rows, kv_rows = _rows(heads, dims.head_dim), _rows(groups, dims.head_dim)
        channels = top_indices(importance.channels[old], sizes.intermediate)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out.put(new.get_submodule(norm), src.get_submodule(norm), emb, None)
        plan = {
            "self_attn.q_proj": (q_rows, emb),
            "self_attn.k_proj": (kv_rows, emb),
            "self_attn.v_proj": (kv_rows, emb),
            "self_attn.o_proj": (emb, q_rows),
            "mlp.gate_proj": (channels, emb),
            "mlp.up_proj": (channels, emb),
            "mlp.down_proj": (emb, channels),
        }
        for path, (rows, cols) in plan.items():
            out.put(new.get_submodule(path), src.get_submodule(path), rows, cols)
        for path in ("self_attn.q_norm", "self_attn.k_norm"):  # per head_dim (Qwen3): copied whole
            if hasattr(src.self_attn, path.rsplit(".", 1)[1]):
                out.put(new.get_submodule(path), src.get_submodule(path), None, None)
    left = [name for name, p in student.named_parameters() if id(p) not in out.filled]
    if left:
        raise RecipeError(f"{FIELD}: no teacher weights map to {left[:3]}")
    student.tie_weights()
    return student
