"""Load teachers and students from a Hugging Face folder or a GGUF file, and save students so that
`AutoModelForCausalLM.from_pretrained` loads them back."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.errors import CompatibilityError, InputError
from distill.io import atomic_folder
from distill.paths import resolve_path
from distill.recipe import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str


# What a broken or foreign model folder raises inside transformers (bad JSON, an unknown model_type, a
# truncated safetensors or GGUF file): reported as one line naming the folder.
LOAD_ERRORS = (OSError, ValueError, KeyError, EOFError, SafetensorError, StrictDataclassError)


def first_line(err: Exception) -> str:
    """The gist of a library error for a one-line message (a line ending in ':' takes the next one too)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def load_tokenizer(source: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of a local folder or GGUF file (never the network: `local_files_only`); pads on the right."""
    folder = _checked_folder(source)
    try:
        tok = AutoTokenizer.from_pretrained(
            str(folder),
            gguf_file=source.gguf_file,
            trust_remote_code=source.trust_remote_code,
            local_files_only=True,
        )
    except LOAD_ERRORS as err:
        raise InputError(f"cannot load a tokenizer from {folder}: {first_line(err)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _checked_folder(source: ModelConfig) -> Path:
    folder = resolve_path(source.path)
    try:
        if not folder.is_dir():
            raise InputError(f"model folder not found: {folder}")
        if source.gguf_file is not None and not (folder / source.gguf_file).is_file():
            raise InputError(f"GGUF file not found: {folder / source.gguf_file}")
        if source.gguf_file is None and not (folder / "config.json").is_file():
            raise InputError(f"not a Hugging Face model folder (no config.json): {folder}")
    except OSError as err:  # the OS refused the path itself (too long, no permission)
        raise InputError(f"cannot use model path {source.path[:160]!r}: {err.strerror or err}") from None
    return folder


def load_model(source: ModelConfig) -> LoadedModel:
    """Load weights (safetensors or GGUF, de-quantised) and the tokenizer; eval mode, no grad. Changes no
    process-wide logging or environment: the CLI quiets the libraries (`distill.cli._configure_libraries`)."""
    folder = _checked_folder(source)
    tokenizer = load_tokenizer(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder),
            gguf_file=source.gguf_file,
            dtype=DTYPES[source.dtype],
            trust_remote_code=source.trust_remote_code,
            use_safetensors=None if source.gguf_file else True,
            local_files_only=True,
        )
    except LOAD_ERRORS as err:
        raise InputError(f"cannot load a model from {folder}: {first_line(err)}") from None
    model.eval()
    name = f"{folder}/{source.gguf_file}" if source.gguf_file else str(folder)
    return LoadedModel(model=model, tokenizer=tokenizer, source=name)


def fresh_copy(model: PreTrainedModel, **config_changes: Any) -> PreTrainedModel:
    """A plain model with the same (or changed) config. GGUF-loaded models refuse `save_pretrained`, so
    students are always rebuilt this way."""
    config = copy.deepcopy(model.config)
    for key, value in config_changes.items():
        setattr(config, key, value)
    for attr in ("gguf_file", "_name_or_path"):
        if hasattr(config, attr):
            setattr(config, attr, "")
    dtype = next(model.parameters()).dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return fresh


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """Hash of the vocabulary content (token -> id), so tokenizers are compared by what they do."""
    vocab = tok.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def shared_vocab(
    teacher_tok: PreTrainedTokenizerBase,
    teacher_model: PreTrainedModel | None,
    student: PreTrainedModel,
    student_tok: PreTrainedTokenizerBase,
) -> int:
    """Check that teacher and student speak the same vocabulary; return the size both use.

    Heads padded to different sizes over the same tokenizer (151936 vs 152064) are fine: logits are sliced
    to the real vocabulary. Different tokenizers are rejected. `teacher_model` may be None for a served
    or cached teacher whose weights are not here.
    """
    if tokenizer_fingerprint(teacher_tok) != tokenizer_fingerprint(student_tok):
        raise CompatibilityError(
            "teacher and student tokenizers differ (vocabulary content mismatch): logit distillation needs "
            "one vocabulary; use a student with the teacher's tokenizer, or the cross-tokenizer method "
            "(method.name: cross_tokenizer_kd)"
        )
    real = len(student_tok)
    heads = [m.get_output_embeddings() for m in (teacher_model, student) if m is not None]
    if any(h is None for h in heads):
        raise CompatibilityError("teacher or student has no output embedding (LM head)")
    sizes = [int(h.weight.shape[0]) for h in heads if h is not None]
    if min(sizes) < real:
        raise CompatibilityError(
            f"an LM head ({min(sizes)} rows) is smaller than the tokenizer ({real} tokens)"
        )
    # Heads padded past the tokenizer (151936 vs 152064 over one tokenizer) hold no real tokens: slice.
    return real


def save_student(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Save safetensors + config + tokenizer (with chat template) atomically: written to a temp folder,
    then renamed into place."""
    with atomic_folder(Path(folder)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _drop_gguf_quantization(Path(tmp) / "config.json")


def _drop_gguf_quantization(config_path: Path) -> None:
    """A model loaded from a GGUF file keeps `quantization_config: {quant_method: gguf}` in its config,
    but the saved weights are plain de-quantized tensors; left in, the key makes other tools (vLLM's
    draft-model loader) refuse the folder."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "gguf":
        del config["quantization_config"]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
