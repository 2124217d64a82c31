"""The teacher cache on disk: manifest, example keys, the log-prob codebook, the top-k codec, and reading
and checking one shard. `cache_writer` produces this format; `cache_reader` serves it.

A cache folder holds ``manifest.json`` and ``shard-NNNNN.parquet`` files, one row per example.

Identity, not position: an example is keyed by a hash of its token ids, so any batch order, batch size,
packing or process count reads the same signal. Integrity: every shard's size and sha256 are in the
manifest and are checked before a shard is used; problems name the file (`InputError`).

Why this encoding: the top-k ids of neighbouring positions overlap heavily, so ids already seen in the
example are stored as short "discovery numbers"; log-probs are quantised to a codebook uniform in
sqrt(p), which spreads the KL error evenly over the k tokens. Column-by-column description and the
measurements behind every choice: ``docs/cache-encoding.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distill.errors import CompatibilityError, InputError, RecipeError

FORMAT_VERSION = 1
ENCODING_NAME = "topk-discovery-sqrtq"
MANIFEST = "manifest.json"

DEFAULT_VALUE_STEP = 0.02
DEFAULT_MAX_STEP = 4.0
DEFAULT_FLOOR = -40.0
DEFAULT_ZSTD_LEVEL = 19
LIST_COLUMNS = ("n_new", "old_refs", "new_ids", "codes", "log_mass")
SPLIT_COLUMNS = [f"{name}.list.element" for name in LIST_COLUMNS]  # leaf paths: plain names miss lists
_UInt = type[np.unsignedinteger[Any]]
_DTYPES: dict[str, _UInt] = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32}


# --------------------------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    file: str
    examples: int
    tokens: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    teacher_id: str
    tokenizer_hash: str
    k: int
    temperature: float
    vocab_size: int
    encoding: dict[str, Any]
    shard_size: int
    data_fingerprint: str  # hash of every example key (and first cached position), in order
    examples: int  # distinct examples with answer tokens
    shards: list[ShardInfo] = field(default_factory=list)
    num_shards: int = 0  # shards when complete
    complete: bool = False
    total_tokens: int = 0
    total_bytes: int = 0
    bytes_per_token: float = 0.0
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Manifest:
        if not isinstance(data, dict):
            raise InputError(f"{where}: not a cache manifest (expected a JSON object)")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise InputError(
                f"{where}: cache format version {version!r} is not supported (this distill reads {FORMAT_VERSION})"
            )
        try:
            shards = [ShardInfo(**s) for s in data["shards"]]
            fields = {k: v for k, v in data.items() if k != "shards"}
            manifest = cls(shards=shards, **fields)
        except (KeyError, TypeError) as err:
            raise InputError(f"{where}: malformed cache manifest ({err})") from None
        if not isinstance(manifest.encoding, dict) or manifest.encoding.get("name") != ENCODING_NAME:
            raise InputError(f"{where}: unknown cache encoding (this distill reads {ENCODING_NAME!r})")
        return manifest

    def settings(self) -> dict[str, Any]:
        """What must agree for a resumed run to continue this cache."""
        names = ("teacher_id", "tokenizer_hash", "k", "temperature", "vocab_size", "encoding")
        return {name: getattr(self, name) for name in (*names, "shard_size", "data_fingerprint", "examples")}


def read_manifest(cache_dir: Path) -> Manifest:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"{path}: no cache manifest (is {cache_dir} a `distill cache` folder?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: unreadable cache manifest ({str(err).splitlines()[0]})") from None
    return Manifest.from_dict(data, str(path))


def example_key(token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
    """Content hash of a sequence's token ids: the example's identity in the cache."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(token_ids, dtype="<i4"))
    return hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------------- codec


def value_levels(step: float, max_step: float, floor: float) -> np.ndarray:
    """Ascending log-prob levels from `floor` up to 0, spaced `step / sqrt(p)` (uniform in sqrt(p)),
    at most `max_step` apart."""
    levels = [0.0]
    while levels[-1] > floor:
        x = levels[-1]
        levels.append(x - min(step * math.exp(-x / 2.0), max_step))
    return np.asarray(levels[::-1], dtype=np.float64)


def encoding_block(vocab_size: int, k: int, value_step: float, zstd_level: int) -> dict[str, Any]:
    """The manifest's description of the encoding: everything a reader needs to decode the shards."""
    if not (value_step > 0 and math.isfinite(value_step)):
        raise RecipeError(f"cache.value_step: must be a finite number > 0, got {value_step!r}")
    levels = value_levels(value_step, DEFAULT_MAX_STEP, DEFAULT_FLOOR)
    if len(levels) > 65536:
        raise RecipeError(
            f"cache.value_step: {value_step} needs {len(levels)} levels (at most 65536); use a larger step"
        )
    return {
        "name": ENCODING_NAME,
        "key": "blake2b-128 (hex) of the example's token ids as int32 little-endian",
        "positions": "answer positions start..start+length-1 (position j predicts token j+1)",
        "ids": "per position: sorted delta-coded discovery numbers of ids seen earlier in the example "
        "(old_refs), then sorted delta-coded first-seen token ids (new_ids); n_new splits them",
        "id_dtype": "uint16" if vocab_size <= 65536 else "uint32",
        "count_dtype": "uint8" if k <= 255 else "uint16",
        "values": {
            "codebook": "sqrt",
            "step": value_step,
            "max_step": DEFAULT_MAX_STEP,
            "floor": DEFAULT_FLOOR,
            "levels": len(levels),
            "order": "ascending token id",
            "dtype": "uint8" if len(levels) <= 256 else "uint16",
        },
        "log_mass": "float16 log of the top-k probability mass (tail mass = 1 - exp(log_mass))",
        "parquet": {"compression": "zstd", "level": zstd_level, "byte_stream_split": SPLIT_COLUMNS},
    }


@dataclass
class Codec:
    """Everything the encoder and decoder need, derived from the manifest's encoding block."""

    k: int
    levels: np.ndarray  # (L,) float64 ascending
    mids: np.ndarray  # (L-1,) thresholds
    id_dtype: _UInt
    count_dtype: _UInt
    code_dtype: _UInt

    @classmethod
    def from_encoding(cls, enc: dict[str, Any], k: int, where: str) -> Codec:
        try:
            val = enc["values"]
            levels = value_levels(float(val["step"]), float(val["max_step"]), float(val["floor"]))
            if len(levels) != int(val["levels"]):
                raise ValueError("codebook size differs")
            return cls(
                k=k,
                levels=levels,
                mids=(levels[1:] + levels[:-1]) / 2.0,
                id_dtype=_DTYPES[enc["id_dtype"]],
                count_dtype=_DTYPES[enc["count_dtype"]],
                code_dtype=_DTYPES[val["dtype"]],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{where}: malformed encoding block in the cache manifest ({err})") from None


@dataclass
class Encoded:
    """One example's cached positions, encoded (flat arrays over its positions)."""

    n_new: np.ndarray
    old_refs: np.ndarray
    new_ids: np.ndarray
    codes: np.ndarray
    log_mass: np.ndarray


class Encoder:
    def __init__(self, codec: Codec, vocab_size: int) -> None:
        self.codec = codec
        self.discovery = np.full(vocab_size, -1, dtype=np.int64)  # reset after each example

    def encode(self, ids: np.ndarray, logprobs: np.ndarray) -> Encoded:
        """ids (n, k) int64, logprobs (n, k) float at the capture temperature, normalised over the vocabulary."""
        c = self.codec
        n, k = ids.shape
        lp = logprobs.astype(np.float64)
        if np.isnan(lp).any() or (lp == np.inf).any():
            raise CompatibilityError("the teacher produced NaN or +inf log-probabilities")
        top = lp.max(axis=1, keepdims=True)  # finite: the top-1 of a distribution
        log_mass = np.minimum(top[:, 0] + np.log(np.exp(lp - top).sum(axis=1)), 0.0)
        order = np.argsort(ids, axis=1, kind="stable")
        ids_sorted = np.take_along_axis(ids, order, axis=1)
        codes = np.searchsorted(c.mids, np.take_along_axis(lp, order, axis=1))  # -inf -> code 0

        disc = self.discovery
        found = 0
        n_new = np.empty(n, dtype=np.int64)
        olds: list[np.ndarray] = []
        news: list[np.ndarray] = []
        try:
            for t in range(n):
                row = ids_sorted[t]
                refs = disc[row]
                seen = refs >= 0
                old = np.sort(refs[seen])
                new = row[~seen]  # already ascending
                disc[new] = found + np.arange(new.size)
                found += new.size
                n_new[t] = new.size
                olds.append(np.diff(old, prepend=0))
                news.append(np.diff(new, prepend=0))
        finally:
            disc[ids_sorted.reshape(-1)] = -1
        return Encoded(
            n_new=n_new.astype(c.count_dtype),
            old_refs=np.concatenate(olds).astype(c.id_dtype) if olds else np.zeros(0, c.id_dtype),
            new_ids=np.concatenate(news).astype(c.id_dtype) if news else np.zeros(0, c.id_dtype),
            codes=codes.astype(c.code_dtype).reshape(-1),
            log_mass=log_mass.astype(np.float16),
        )


def _segment_cumsum(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Cumulative sums restarted at every segment (segment lengths `counts`)."""
    csum = np.cumsum(values, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    base = np.concatenate([np.zeros(1, np.int64), csum])[starts]
    return csum - np.repeat(base, counts)


def _index_in_segment(counts: np.ndarray) -> np.ndarray:
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(starts, counts)


def decode(codec: Codec, parts: Sequence[Encoded], where: str = "cache") -> tuple[np.ndarray, np.ndarray]:
    """Decode examples, concatenated: ids (N, k) int64 and log-probs (N, k) float32 sorted descending.
    Contents that cannot be a valid encoding are an `InputError` naming `where`."""
    k = codec.k
    n_new = np.concatenate([p.n_new for p in parts]).astype(np.int64)
    n_rows = n_new.size
    if n_rows == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    if (n_new > k).any():
        raise InputError(f"{where}: corrupt cache contents (n_new exceeds k)")
    n_old = k - n_new
    new_abs = _segment_cumsum(np.concatenate([p.new_ids for p in parts]).astype(np.int64), n_new)
    old_rel = _segment_cumsum(np.concatenate([p.old_refs for p in parts]).astype(np.int64), n_old)
    # discovery numbers are per example: offset each example's references into the concatenated new ids
    ex_new = np.array([int(p.n_new.astype(np.int64).sum()) for p in parts], dtype=np.int64)
    ex_old = np.array([int(p.n_new.size * k - p.n_new.astype(np.int64).sum()) for p in parts], dtype=np.int64)
    ex_off = np.cumsum(ex_new) - ex_new
    ref = old_rel + np.repeat(ex_off, ex_old)
    if ref.size and (old_rel.min() < 0 or (old_rel >= np.repeat(ex_new, ex_old)).any()):
        raise InputError(f"{where}: corrupt cache contents (reference to an undiscovered id)")
    old_ids = new_abs[ref]
    rows = np.empty(n_rows * k, dtype=np.int64)
    old_row = np.repeat(np.arange(n_rows, dtype=np.int64), n_old)
    rows[old_row * k + _index_in_segment(n_old)] = old_ids
    new_row = np.repeat(np.arange(n_rows, dtype=np.int64), n_new)
    rows[new_row * k + n_old[new_row] + _index_in_segment(n_new)] = new_abs
    ids = rows.reshape(n_rows, k)
    ids.sort(axis=1)
    codes = np.concatenate([p.codes for p in parts]).astype(np.int64).reshape(n_rows, k)
    lp = codec.levels[codes]
    top = lp.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(lp - top).sum(axis=1))
    log_mass = np.concatenate([p.log_mass for p in parts]).astype(np.float64)
    lp += (log_mass - lse)[:, None]
    order = np.argsort(-lp, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(lp, order, axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------- shards


def verify_shard(cache_dir: Path, info: ShardInfo) -> bytes:
    """The shard's bytes, after checking them against the manifest's size and sha256."""
    path = cache_dir / info.file
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: cache shard missing") from None
    except OSError as err:
        raise InputError(f"{path}: cache shard unreadable ({err.strerror})") from None
    if len(data) != info.bytes:
        raise InputError(
            f"{path}: cache shard truncated or resized ({len(data)} bytes, manifest says {info.bytes})"
        )
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise InputError(f"{path}: cache shard corrupted (sha256 differs from the manifest)")
    return data


@dataclass
class Shard:
    """A verified shard's columns as flat numpy arrays plus per-example offsets."""

    keys: list[str]
    starts: np.ndarray
    lengths: np.ndarray
    values: dict[str, np.ndarray]
    offsets: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        arrays = [*self.values.values(), *self.offsets.values(), self.starts, self.lengths]
        return sum(a.nbytes for a in arrays) + 100 * len(self.keys)

    def part(self, row: int) -> Encoded:
        def sl(name: str) -> np.ndarray:
            off = self.offsets[name]
            return self.values[name][off[row] : off[row + 1]]

        return Encoded(sl("n_new"), sl("old_refs"), sl("new_ids"), sl("codes"), sl("log_mass"))


def parse_shard(path: Path, data: bytes, k: int) -> Shard:
    try:
        table = pq.read_table(pa.BufferReader(data))
        keys = [str(x) for x in table.column("key").to_pylist()]
        starts = table.column("start").to_numpy().astype(np.int64)
        lengths = table.column("length").to_numpy().astype(np.int64)
        values: dict[str, np.ndarray] = {}
        offsets: dict[str, np.ndarray] = {}
        for name in LIST_COLUMNS:
            col = table.column(name).combine_chunks()
            off = col.offsets.to_numpy().astype(np.int64)
            offsets[name] = off - off[0]
            values[name] = col.flatten().to_numpy(zero_copy_only=False)
    except (pa.ArrowException, KeyError, OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable cache shard ({str(err).splitlines()[0]})") from None
    n_new_len = np.diff(offsets["n_new"])
    if (
        not np.array_equal(n_new_len, lengths)
        or not np.array_equal(np.diff(offsets["codes"]), lengths * k)
        or not np.array_equal(np.diff(offsets["log_mass"]), lengths)
    ):
        raise InputError(f"{path}: inconsistent cache shard (column lengths disagree)")
    return Shard(keys=keys, starts=starts, lengths=lengths, values=values, offsets=offsets)


__all__ = [
    "DEFAULT_VALUE_STEP",
    "MANIFEST",
    "Codec",
    "Encoded",
    "Encoder",
    "Manifest",
    "Shard",
    "ShardInfo",
    "decode",
    "encoding_block",
    "example_key",
    "parse_shard",
    "read_manifest",
    "value_levels",
    "verify_shard",
]
