"""A feature-level drafter for speculative decoding (EAGLE, Li et al. 2024; FSPAD), with an optional reduced
draft vocabulary (EAGLE-3, Li et al. 2025).

At position t the drafter reads the target's last hidden state h_{t-1} (the feature the target computed
one position earlier) and the embedding of token x_t, mixes them with a linear `fc` (2H -> H), runs ONE
decoder layer of the target's architecture, then the target's final norm (a frozen copy) and a head. Its
output feature h'_t regresses the target's h_t, and head(h'_t) predicts x_{t+1} as the target's head(h_t)
does. While drafting, h'_t stands in for the unknown h_t at the next step.

Features are taken AFTER the target's final norm, as in EAGLE(-1): that is the vector the target's LM
head reads, so "predict the next feature" and "predict the next token" are one task (head(h) is exactly
the target's logits), and the normed vectors have a bounded scale, whereas the pre-norm residual stream
carries a few very large outlier channels that would dominate a regression loss.

The embedding table and (full-vocabulary) LM head are the target's own, frozen and NOT registered as
submodules: they are neither trained, nor checkpointed, nor saved. With `d2t` (K target ids) the head is a
trainable K-row matrix over the K most frequent target tokens, mapped back to target ids by `d2t`.

Saved as a folder: `model.safetensors` (the trainable weights and `d2t`, nothing else) and `drafter.json`
(the layer's config and the target's fingerprint); loading needs the target (`load_drafter`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PreTrainedModel

from distill.errors import CompatibilityError, InputError
from distill.generation.engine import cache_keyword
from distill.io import atomic_folder, write_json_atomic

DRAFTER_JSON = "drafter.json"
WEIGHTS = "model.safetensors"
FORMAT = "distill-feature-drafter/1"


def _final_norm(model: PreTrainedModel) -> nn.Module:
    norm = getattr(model.base_model, "norm", None)
    if not isinstance(norm, nn.Module):
        raise CompatibilityError(
            f"{type(model).__name__}: no final norm (.model.norm) to copy into a drafter"
        )
    return norm


class FeatureDrafter(nn.Module):
    """fc -> one decoder layer -> the target's final norm (frozen copy); the head is the target's (full
    vocabulary, frozen) or a K-row trainable one with its `d2t` map."""

    def __init__(
        self, backbone: PreTrainedModel, target: PreTrainedModel, vocab: int, d2t: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        layers = getattr(backbone, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) != 1:
            raise CompatibilityError(
                "student: a feature drafter is ONE decoder layer; set student.prune.keep_layers: 1"
            )
        hidden = int(target.config.hidden_size)
        if int(backbone.config.hidden_size) != hidden:
            raise CompatibilityError(
                f"student: the drafter layer's width ({backbone.config.hidden_size}) differs from the "
                f"target's ({hidden}); prune depth only"
            )
        self.config = backbone.config
        self.vocab = vocab
        self.hidden = hidden
        backbone.register_module("embed_tokens", None)  # tokens: the target's table, as inputs_embeds
        norm = _final_norm(backbone)
        norm.load_state_dict(_final_norm(target).state_dict())
        norm.requires_grad_(False)
        self.backbone = backbone
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        with torch.no_grad():  # both inputs pass unchanged at first: [I | I]; the layer's input norm rescales
            eye = torch.eye(hidden, dtype=self.fc.weight.dtype)
            self.fc.weight.copy_(torch.cat([eye, eye], dim=1))
        self.fc.to(next(backbone.parameters()).dtype)
        embed, head = target.get_input_embeddings(), target.get_output_embeddings()
        if embed is None or head is None:
            raise CompatibilityError("target: a feature drafter needs the target's embeddings and LM head")
        self._frozen = (embed, head)  # a tuple: not registered, so not trained, checkpointed or saved
        self.head: nn.Linear | None = None
        self.d2t: torch.Tensor | None
        if d2t is None:
            self.register_buffer("d2t", None)
        else:
            d2t = d2t.long().cpu()
            if d2t.dim() != 1 or not len(d2t) or int(d2t.max()) >= vocab or int(d2t.min()) < 0:
                raise CompatibilityError(f"draft vocabulary: ids must be a non-empty list in [0, {vocab})")
            self.head = nn.Linear(hidden, len(d2t), bias=False).to(self.fc.weight.dtype)
            with torch.no_grad():
                self.head.weight.copy_(head.weight[d2t.to(head.weight.device)].to(self.head.weight))
            self.register_buffer("d2t", d2t.to(self.fc.weight.device))

    @property
    def draft_vocab(self) -> int | None:
        return None if self.d2t is None else int(self.d2t.shape[0])

    def head_weight(self) -> torch.Tensor:
        """(V or K, H): the rows logits are computed with (the target's are sliced to the tokenizer)."""
        return self.head.weight if self.head is not None else self._frozen[1].weight[: self.vocab]

    def forward(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        """Output features (B, W, H), after the final norm: position w reads `features[:, w]` (the target's,
        or the drafter's own, feature one position earlier) and the token `input_ids[:, w]`."""
        embed = self._frozen[0](input_ids).to(self.fc.weight.dtype)
        x = self.fc(torch.cat([features.to(embed.dtype), embed], dim=-1))
        kwargs: dict[str, Any] = {"use_cache": cache is not None}
        if cache is not None:
            kwargs[cache_keyword(self.backbone)] = cache
        out = self.backbone(
            inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        hidden: torch.Tensor = out.last_hidden_state
        return hidden

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(..., V) logits over the target's vocabulary, or (..., K) over the draft vocabulary `d2t`."""
        return features @ self.head_weight().T


def build_drafter(
    target: PreTrainedModel, vocab: int, layer: PreTrainedModel | None = None, d2t: torch.Tensor | None = None
) -> FeatureDrafter:
    """A drafter for `target`: the one-block body of `layer` (a causal LM pruned to one block, whose weights
    initialise the layer) or, without it, a fresh block of the target's architecture."""
    if layer is None:
        config = target.config.__class__.from_dict(target.config.to_dict())
        config.num_hidden_layers = 1
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[-1:]
        backbone = AutoModel.from_config(config, dtype=next(target.parameters()).dtype)
    else:
        backbone = layer.base_model
    return FeatureDrafter(backbone, target, vocab, d2t)


def frequent_tokens(sequences: Iterable[Sequence[int]], k: int, vocab: int) -> torch.Tensor:
    """The `k` most frequent ids of `sequences` (ties and ids never seen: lowest id first), sorted
    ascending, so greedy ties among kept tokens break to the lowest id as the target's arg-max does."""
    if not 1 <= k <= vocab:
        raise CompatibilityError(f"method.draft_vocab: must be in [1, {vocab}] (the vocabulary), got {k}")
    counts: Counter[int] = Counter()
    for seq in sequences:
        counts.update(int(t) for t in seq if 0 <= int(t) < vocab)
    ranked = sorted(counts, key=lambda t: (-counts[t], t))[:k]
    chosen = set(ranked)
    filler = (t for t in range(vocab) if t not in chosen)
    while len(ranked) < k:
        ranked.append(next(filler))
    return torch.tensor(sorted(ranked), dtype=torch.long)


def target_fingerprint(target: PreTrainedModel, tokenizer: Any = None) -> dict[str, Any]:
    """What identifies the target a drafter was trained for: its shape, its tokenizer, and the statistics
    of its final-norm weights (two checkpoints of one architecture differ there)."""
    from distill.models.loading import tokenizer_fingerprint

    norm = torch.cat([p.detach().float().flatten().cpu() for p in _final_norm(target).parameters()])
    cfg = target.config
    return {
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "vocab_size": int(cfg.vocab_size),
        "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "norm_mean": float(norm.mean()) if norm.numel() else 0.0,
        "norm_rms": float(norm.square().mean().sqrt()) if norm.numel() else 0.0,
    }


def fingerprint_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why a drafter trained for `saved` does not fit the target `current`; None when it fits."""
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if saved.get(key) != current.get(key):
            return f"{key} {saved.get(key)} (drafter's target) vs {current.get(key)} (this target)"
    if saved.get("tokenizer") and current.get("tokenizer") and saved["tokenizer"] != current["tokenizer"]:
        return "the tokenizers differ"
    for key in ("norm_mean", "norm_rms"):
        a, b = float(saved.get(key, 0.0)), float(current.get(key, 0.0))
        if abs(a - b) > 1e-2 * max(abs(a), abs(b), 1e-6):
            return f"the final-norm weights differ ({key} {a:.4g} vs {b:.4g}): another checkpoint"
    return None


def save_drafter(drafter: FeatureDrafter, folder: Path, fingerprint: dict[str, Any], **extra: Any) -> None:
    """The drafter's own trainable weights and `d2t` (safetensors) and drafter.json, written atomically."""
    tensors = {n: p.detach().cpu().contiguous() for n, p in drafter.named_parameters() if p.requires_grad}
    if drafter.d2t is not None:
        tensors["d2t"] = drafter.d2t.detach().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "vocab": drafter.vocab,
        "draft_vocab": drafter.draft_vocab,
        "layer_config": drafter.config.to_dict(),
        "target": fingerprint,
        **extra,
    }
    with atomic_folder(Path(folder)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
        write_json_atomic(tmp / DRAFTER_JSON, meta)


def is_drafter_folder(path: Path) -> bool:
    return (Path(path) / DRAFTER_JSON).is_file()


def read_meta(folder: Path, field: str = "--draft") -> dict[str, Any]:
    path = Path(folder) / DRAFTER_JSON
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{field}: cannot read {path}: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{field}: {path} is not a feature-drafter description ({FORMAT})")
    return meta


def load_drafter(
    folder: Path, target: PreTrainedModel, tokenizer: Any = None, field: str = "--draft"
) -> FeatureDrafter:
    """The drafter saved in `folder`, rebuilt around `target` (weights only: safetensors, no pickle). A
    drafter trained for another target is refused with one line naming `field`."""
    meta = read_meta(folder, field)
    why = fingerprint_mismatch(meta.get("target", {}), target_fingerprint(target, tokenizer))
    if why is not None:
        raise CompatibilityError(f"{field}: this feature drafter was trained for another target: {why}")
    try:
        tensors = load_file(str(Path(folder) / WEIGHTS))
        config = target.config.__class__.from_dict(meta["layer_config"])
    except (OSError, SafetensorError, KeyError, ValueError, TypeError) as err:
        raise InputError(f"{field}: cannot load the drafter in {folder}: {err}") from None
    dtype = next(target.parameters()).dtype
    backbone = AutoModel.from_config(config, dtype=dtype)
    drafter = FeatureDrafter(backbone, target, int(meta["vocab"]), tensors.pop("d2t", None))
    own = {n for n, p in drafter.named_parameters() if p.requires_grad}
    if set(tensors) != own:
        raise InputError(
            f"{field}: {folder / WEIGHTS} holds other weights than this drafter's "
            f"(missing {sorted(own - set(tensors))[:3]}, extra {sorted(set(tensors) - own)[:3]})"
        )
    drafter.load_state_dict({n: t.to(dtype) for n, t in tensors.items()}, strict=False)
    return drafter.to(next(target.parameters()).device).eval()
