"""A teacher's layer count and vocabulary size, read from its files without loading it.

`preflight` uses these to refuse impossible settings (pruning to more layers than the teacher has, a
top-k above its vocabulary) in a second instead of after minutes of loading and generating. Imports
neither torch, transformers nor numpy. A GGUF header is walked here directly: `gguf.GGUFReader` parses
every token and merge string into numpy views, which takes 5-8 s on SmolLM2's 98 MB file.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.errors import RecipeError

# GGUF value types: fixed-size scalars by struct code; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_TOKENS = "tokenizer.ggml.tokens"


@dataclass(frozen=True)
class ModelFacts:
    """What validation needs to know about a model; None where the files do not say."""

    layers: int | None
    vocab: int | None


def read_facts(folder: Path, gguf_file: str | None) -> ModelFacts | None:
    """Facts of a Hugging Face folder (`config.json`) or a GGUF file; None if they cannot be read."""
    try:
        if gguf_file is not None:
            return _gguf_facts(folder / gguf_file)
        return _config_facts(folder / "config.json")
    except (OSError, ValueError, struct.error, OverflowError):
        return None


def check_prune_fits(keep_layers: int | None, layers: list[int] | None, total: int) -> None:
    """Refuse a depth-pruning choice the teacher cannot satisfy, naming the recipe field."""
    if keep_layers is not None and keep_layers > total:
        raise RecipeError(
            f"student.prune.keep_layers: {keep_layers} is more than the teacher's {total} layers"
        )
    bad = [i for i in layers or [] if not 0 <= i < total]
    if bad:
        raise RecipeError(
            f"student.prune.layers: {bad} out of range for the teacher's {total} layers (indices 0-{total - 1})"
        )


def check_top_k_fits(k: int, vocab: int) -> None:
    """Refuse a cache top-k larger than the teacher's vocabulary, naming the recipe field."""
    if k > vocab:
        raise RecipeError(f"cache.k: {k} is above the teacher's vocabulary ({vocab} tokens)")


def _config_facts(path: Path) -> ModelFacts | None:
    config = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        return None
    text = config.get("text_config")  # multimodal configs keep the language model's numbers here
    sections = [config, text] if isinstance(text, dict) else [config]
    return ModelFacts(
        layers=_first_int(sections, "num_hidden_layers"),
        vocab=_first_int(sections, "vocab_size"),
    )


def _first_int(sections: list[dict[str, Any]], key: str) -> int | None:
    for section in sections:
        value = section.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _gguf_facts(path: Path) -> ModelFacts | None:
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _GGUFHeader(buf).facts()


class _GGUFHeader:
    """Walks the key/value section of a GGUF v2/v3 file, stopping once the facts are found."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        if buf[:4] != b"GGUF":
            raise ValueError("not a GGUF file")
        version = struct.unpack_from("<I", buf, 4)[0]
        self.order = "<" if version & 0xFFFF else ">"  # big-endian files read as a huge little-endian number
        self.version = struct.unpack_from(self.order + "I", buf, 4)[0]
        self.pos = 8

    def _read(self, code: str) -> Any:
        fmt = self.order + code
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        size = self._read("Q")
        raw = self.buf[self.pos : self.pos + size]
        self.pos += size
        return raw.decode("utf-8", errors="replace")

    def _skip(self, kind: int, count: int = 1) -> None:
        if kind in _SCALARS:
            self.pos += struct.calcsize(_SCALARS[kind]) * count
        elif kind == _STRING:
            for _ in range(count):
                size = self._read("Q")  # read first: `self.pos += self._read(...)` would lose the 8 bytes
                self.pos += size
        elif kind == _ARRAY:
            for _ in range(count):
                inner, n = self._read("I"), self._read("Q")
                self._skip(inner, n)
        else:
            raise ValueError(f"unknown GGUF value type {kind}")
        if self.pos > len(self.buf):
            raise ValueError("GGUF header runs past the end of the file")

    def facts(self) -> ModelFacts | None:
        if self.version < 2:
            return None  # v1 used 32-bit lengths; no current tool writes it
        self._read("Q")  # tensor count
        kv_count = self._read("Q")
        found: dict[str, Any] = {}
        arch = ""
        for _ in range(kv_count):
            key, kind = self._string(), self._read("I")
            if kind == _STRING and key == "general.architecture":
                arch = found[key] = self._string()
            elif kind == _ARRAY and key == _TOKENS:
                inner, n = self._read("I"), self._read("Q")
                found[key] = n
                self._skip(inner, n)
            elif kind in _SCALARS and key.endswith((".block_count", ".vocab_size")):
                found[key] = self._read(_SCALARS[kind])
            else:
                self._skip(kind)
            if arch and f"{arch}.block_count" in found and _TOKENS in found:
                break
        layers = found.get(f"{arch}.block_count")
        vocab = found.get(_TOKENS) or found.get(f"{arch}.vocab_size")
        return ModelFacts(layers=int(layers) if layers else None, vocab=int(vocab) if vocab else None)
