"""Sentence encoders: a transformers encoder + the pooling a sentence-transformers folder declares.

The teacher is read from a sentence-transformers folder without importing sentence-transformers (it is
only needed by users who load the export); the student is made from the teacher (blocks kept, or a fresh
config of the same architecture and tokenizer) and exported as a folder `SentenceTransformer(path)` loads.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from distill.errors import InputError
from distill.io import write_json_atomic

_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
}


class SentenceEncoder(nn.Module):
    """`model` (a transformers encoder) pooled over real tokens, then L2-normalised if the folder said so."""

    def __init__(self, model: PreTrainedModel, pooling: str = "mean", normalize: bool = True) -> None:
        super().__init__()
        if pooling not in ("mean", "cls", "max"):
            raise ValueError(f"pooling {pooling!r}: expected mean, cls or max")
        self.model, self.pooling, self.normalize = model, pooling, normalize

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    def blocks(self) -> nn.ModuleList:
        """The encoder's transformer blocks (BERT-like `encoder.layer`)."""
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise InputError(f"teacher.path: {type(self.model).__name__} has no encoder.layer blocks")
        return layers

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            out = hidden[:, 0]
        elif self.pooling == "max":
            out = hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(1)
        else:
            out = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return nn.functional.normalize(out, dim=-1) if self.normalize else out


def read_pooling(folder: Path) -> tuple[str, bool]:
    """(pooling, normalize) as the folder's modules.json / 1_Pooling declare; mean + no norm otherwise."""
    pooling, normalize = "mean", False
    modules = folder / "modules.json"
    if modules.is_file():
        entries = json.loads(modules.read_text(encoding="utf-8"))
        normalize = any(str(e.get("type", "")).endswith("Normalize") for e in entries)
        for e in entries:
            if str(e.get("type", "")).endswith("Pooling"):
                cfg_path = folder / e.get("path", "1_Pooling") / "config.json"
                if cfg_path.is_file():
                    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
                    pooling = next((v for k, v in _POOLING.items() if cfg.get(k)), "mean")
    return pooling, normalize


def load_encoder(
    folder: Path, trust_remote_code: bool = False
) -> tuple[SentenceEncoder, PreTrainedTokenizerBase]:
    """The teacher and its tokenizer, from a sentence-transformers (or plain transformers) folder."""
    try:
        model = AutoModel.from_pretrained(folder, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise InputError(
            f"teacher.path: cannot load an encoder from {folder} ({str(err).splitlines()[0]})"
        ) from None
    pooling, normalize = read_pooling(folder)
    return SentenceEncoder(model.eval(), pooling, normalize), tokenizer


def evenly_spaced(depth: int, keep: int) -> list[int]:
    """`keep` block indices spread over `depth`, first and last included (0, 2, 5 of 6 for 3)."""
    if keep == 1:
        return [depth - 1]
    return [round(i * (depth - 1) / (keep - 1)) for i in range(keep)]


def prune_depth(teacher: SentenceEncoder, layers: list[int]) -> SentenceEncoder:
    """A copy of the teacher with only `layers` (embeddings, pooling and the kept blocks' weights)."""
    student = copy.deepcopy(teacher)
    blocks = student.blocks()
    kept = nn.ModuleList(blocks[i] for i in layers)
    student.model.encoder.layer = kept  # type: ignore[union-attr]
    student.model.config.num_hidden_layers = len(layers)
    return student.train()


def set_dropout(encoder: SentenceEncoder, p: float) -> SentenceEncoder:
    """Every dropout of the encoder (and its config) at `p`. Distillation regresses a deterministic
    teacher, so the default student trains without dropout."""
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hasattr(encoder.model.config, key):
            setattr(encoder.model.config, key, p)
    return encoder


def fresh_encoder(
    teacher: SentenceEncoder,
    num_layers: int | None,
    hidden: int | None,
    heads: int | None,
    intermediate: int | None,
) -> SentenceEncoder:
    """A randomly initialised encoder of the teacher's architecture and vocabulary, smaller as asked."""
    config = copy.deepcopy(teacher.model.config)
    updates: dict[str, Any] = {
        "num_hidden_layers": num_layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
    }
    for key, value in updates.items():
        if value is not None:
            setattr(config, key, value)
    if config.hidden_size % config.num_attention_heads:
        raise InputError(
            f"student.heads: {config.num_attention_heads} does not divide hidden_size {config.hidden_size}"
        )
    model = AutoModel.from_config(config)
    return SentenceEncoder(model, teacher.pooling, teacher.normalize).train()


def export_sentence_transformers(
    encoder: SentenceEncoder, tokenizer: PreTrainedTokenizerBase, folder: Path, max_length: int
) -> None:
    """A sentence-transformers folder: the transformer and tokenizer at the root, pooling and normalize
    modules after it (safetensors weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder.model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if encoder.normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
        (folder / "2_Normalize").mkdir(exist_ok=True)
    pooling = {key: encoder.pooling == value for key, value in _POOLING.items()}
    pooling["pooling_mode_mean_sqrt_len_tokens"] = False
    write_json_atomic(
        folder / "1_Pooling" / "config.json", {"word_embedding_dimension": encoder.width, **pooling}
    )
    write_json_atomic(folder / "modules.json", modules)
    write_json_atomic(
        folder / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False}
    )
