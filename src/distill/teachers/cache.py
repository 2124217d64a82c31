"""Offline teacher cache: the teacher's top-k next-token log-probabilities, computed once, read many times.

`write_cache` runs a teacher (live model, or any sparse source such as a server) over tokenised examples
and stores, for every answer position (where the target is not -100), the top-k token ids, their
log-probabilities at the capture temperature, and the mass the top-k leave out. `CachedTeacherSource`
serves them back as a `SparseTeacherSignal` for any batch.

Layout of a cache folder::

    manifest.json          format version, teacher id, tokenizer content hash, k, capture temperature,
                           vocab size, encoding, per-shard {file, examples, tokens, sha256, bytes}, totals
    shard-00000.parquet    one row per example (plain list columns: `datasets` reads them)
    shard-00001.parquet    ...

Identity, not position. Every example is keyed by a hash of its token ids (blake2b-128 over int32
little-endian). The reader splits each batch row into its sequences (padding via the attention mask,
packing via position-id resets), hashes each and looks it up, so any batch order, batch size, packing or
process count reads the same signal: nothing is indexed by step, rank or place in the dataset.

Resume. Shards hold a fixed, deterministic run of examples; each shard and then the manifest are written
atomically (temp file in the folder, fsync, rename). A killed run, restarted with the same arguments,
verifies the shards the manifest lists (sha256), keeps them and recomputes from the first missing one.

Integrity. The reader checks the size and sha256 of every shard when it first opens it, and reports a
missing, truncated, corrupted or unreadable shard by file name (`InputError`); a tokenizer other than the
one the cache was made with is a `CompatibilityError`.

Encoding (format 1, "topk-discovery-sqrtq"). One Parquet row per example with columns
``key`` (hex), ``start`` (first cached position = prompt_len - 1), ``length`` (positions) and, flattened
over its positions:

* ``n_new`` (uint8): how many of the position's k ids were not among the ids of earlier positions of the
  same example. Those ids get "discovery numbers" 0, 1, 2, ... in the order they first appear.
* ``old_refs`` (uint16/uint32): the discovery numbers of the position's already-seen ids, sorted and
  delta-coded within the position. Neighbouring positions share most candidates: on the quickstart data
  41 of the 64 ids at a position already appeared earlier in the example, and their discovery numbers
  cost ~5 bits each instead of ~11 for a token id.
* ``new_ids`` (uint16/uint32): the position's first-seen token ids, sorted, delta-coded.
* ``codes`` (uint8, uint16 for fine steps): the log-probs, in ascending token-id order, quantised to a
  fixed codebook that is uniform in sqrt(p): level spacing in log space ``step / sqrt(p)`` capped at
  ``max_step``, from log p = 0 down to ``floor``. The KL error of a quantised distribution is
  ~ sum_i p_i * err_i^2 / 2, which this spacing makes equal for every token, so spending bits evenly.
* ``log_mass`` (float16): log of the top-k mass, so the tail mass is ``1 - exp(log_mass)`` and decoded
  log-probs are shifted per row to sum to exactly that mass (errors stay inside the top-k shape).

Parquet: zstd level 19, no dictionaries, BYTE_STREAM_SPLIT on the integer and float columns (stored as
4-byte physical ints, so splitting their bytes into planes lets zstd drop the zero planes).
Decoding is vectorised numpy over all positions of a batch; a small LRU keeps recently used shards.

Measured on the quickstart (SmolLM2-135M-Instruct teacher, its answers to 64 training prompts, ~3.7k
answer tokens, k = 64, T = 1). Bytes are whole shard files per cached token. (b) is KL(p_exact || p_dec)
with both top-64 distributions renormalised; (a) is |KL(p_exact||q) - KL(p_dec||q)| for the untrained
6-layer pruned student q, whose KL(p_exact||q) is ~16.7 nats: (a) is first order in the value errors and
scales with |log p - log q|, so this q magnifies it (q = the teacher at T=2, KL ~1.2 nats, gives a third).

====================================================  =========  =========  =========
parts of the encoding (zstd 19)                        bytes/tok  (b)        (a)
====================================================  =========  =========  =========
ids in log-prob order, uint16                          113        -          -
ids sorted, delta-coded, 2 byte planes                 76         -          -
ids discovery-coded (chosen: old_refs+new_ids+n_new)   61         -          -
values uniform in log p, step 0.1, id order (uint8)    57         1.5e-4     9.5e-3
values sqrt codebook step 0.02, id order (chosen)      30         6.8e-4     1.1e-2
values sqrt codebook step 0.002                        55         9.6e-6     9.9e-4
log_mass float16; key, start, length, footer           1.9; 0.9   -          -
====================================================  =========  =========  =========

Whole cache (``python benchmarks/cache.py``; spread prompts, 3668 tokens): value_step 0.02 (default)
93.5 bytes/token, (b) 6.8e-4, (a) 1.1e-2; 0.005: 108.0, 5.5e-5, 2.4e-3; 0.0015: 121.8, 5.5e-6, 7.3e-4;
0.04: 88.2, 2.2e-3, 2.3e-2. zstd level 3 / 9 / 19: 98.6 / 96.8 / 94.0 bytes/token. The default meets
<= 100 bytes/token with (b) <= 1e-3; (a) <= 1e-3 against this student needs value_step <= 0.0015 (~122).
Not adopted: a per-shard frequency remap of new ids (-1.4 net), recency ranks instead of discovery
numbers (-2, but sequential decoding), parametric fits of the sorted curve (need ids in log-prob order).

Why (a) <= 1e-3 does not fit in 100 bytes/token (same data, values only, zstd 19): (a) is first order in
the absolute errors of mid- and low-probability entries (p ~ 1e-2..1e-5, where |log p - log q| is
largest), not of the top few. Codebooks spaced ``c * p**(gamma - 1)`` in log space (gamma 0.3 to 0.8;
0.5 is the sqrt codebook, 1 is uniform in p), deriving the top-1 from the mass, or a head/tail split (top
2..12 values uniform in p, in rank order, with their indices) all give (a) ~ 5e-3 at ~35 bytes/token of
values, and every halving of (a) costs ~8 bytes/token (one bit per value): (a) <= 1e-3 needs ~55 bytes/token
of values beside ~61 of ids. zstd is already within a few % of the codes' order-0 entropy; conditioning a
value on the same id's code at the previous position saves < 1 bit; an ideal adaptive model of the ids
(per-example recurrence counts + a shard-wide unigram) measured 67 bytes/token, worse than discovery
coding. Against the trained quickstart student (KL ~3.6 nats) the default gives (a) 7.0e-3.

(Full numbers: ``python benchmarks/cache.py``.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distill.data.batching import Batch, collate
from distill.data.tokenize import TokenizedExample
from distill.errors import CompatibilityError, InputError
from distill.teachers.base import SparseTeacherSignal, TeacherSignal, TeacherSource

FORMAT_VERSION = 1
ENCODING_NAME = "topk-discovery-sqrtq"
MANIFEST = "manifest.json"

DEFAULT_VALUE_STEP = 0.02
DEFAULT_MAX_STEP = 4.0
DEFAULT_FLOOR = -40.0
DEFAULT_ZSTD_LEVEL = 19
LIST_COLUMNS = ("n_new", "old_refs", "new_ids", "codes", "log_mass")
_SPLIT_COLUMNS = [f"{name}.list.element" for name in LIST_COLUMNS]  # leaf paths: plain names miss lists


class _Progress(Protocol):
    """The engine's progress hook, structurally (teachers/ may not import engine/)."""

    def start(self, label: str, total: int | None) -> None: ...
    def advance(self, n: int = 1, info: str = "") -> None: ...
    def finish(self) -> None: ...
    def log(self, message: str) -> None: ...


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
        return {
            "teacher_id": self.teacher_id,
            "tokenizer_hash": self.tokenizer_hash,
            "k": self.k,
            "temperature": self.temperature,
            "vocab_size": self.vocab_size,
            "encoding": self.encoding,
            "shard_size": self.shard_size,
            "data_fingerprint": self.data_fingerprint,
            "examples": self.examples,
        }


def read_manifest(cache_dir: Path) -> Manifest:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"{path}: no cache manifest (is {cache_dir} a `distill cache` folder?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: unreadable cache manifest ({str(err).splitlines()[0]})") from None
    return Manifest.from_dict(data, str(path))


# ----------------------------------------------------------------------------------------- atomic files


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows opening a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------------- keys


def example_key(token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
    """Content hash of a sequence's token ids: the example's identity in the cache."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(token_ids, dtype="<i4"))
    return hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()


# --------------------------------------------------------------------------------------------- encoding


def value_levels(step: float, max_step: float, floor: float) -> np.ndarray:
    """Ascending log-prob levels from `floor` up to 0, spaced `step / sqrt(p)` (uniform in sqrt(p)),
    at most `max_step` apart."""
    levels = [0.0]
    while levels[-1] > floor:
        x = levels[-1]
        levels.append(x - min(step * math.exp(-x / 2.0), max_step))
    return np.asarray(levels[::-1], dtype=np.float64)


def _encoding(vocab_size: int, k: int, value_step: float, zstd_level: int) -> dict[str, Any]:
    if not (value_step > 0 and math.isfinite(value_step)):
        raise ValueError(f"value_step: must be a finite number > 0, got {value_step!r}")
    levels = value_levels(value_step, DEFAULT_MAX_STEP, DEFAULT_FLOOR)
    if len(levels) > 65536:
        raise ValueError(
            f"value_step: {value_step} needs {len(levels)} levels (at most 65536); use a larger step"
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
        "parquet": {"compression": "zstd", "level": zstd_level, "byte_stream_split": _SPLIT_COLUMNS},
    }


@dataclass
class _Codec:
    """Everything the encoder and decoder need, derived from the manifest's encoding block."""

    k: int
    levels: np.ndarray  # (L,) float64 ascending
    mids: np.ndarray  # (L-1,) thresholds
    id_dtype: type[np.unsignedinteger[Any]]
    count_dtype: type[np.unsignedinteger[Any]]
    code_dtype: type[np.unsignedinteger[Any]]

    @classmethod
    def from_encoding(cls, enc: dict[str, Any], k: int, where: str) -> _Codec:
        dtypes: dict[str, type[np.unsignedinteger[Any]]] = {
            "uint8": np.uint8,
            "uint16": np.uint16,
            "uint32": np.uint32,
        }
        try:
            val = enc["values"]
            levels = value_levels(float(val["step"]), float(val["max_step"]), float(val["floor"]))
            if len(levels) != int(val["levels"]):
                raise ValueError("codebook size differs")
            return cls(
                k=k,
                levels=levels,
                mids=(levels[1:] + levels[:-1]) / 2.0,
                id_dtype=dtypes[enc["id_dtype"]],
                count_dtype=dtypes[enc["count_dtype"]],
                code_dtype=dtypes[val["dtype"]],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{where}: malformed encoding block in the cache manifest ({err})") from None


@dataclass
class _Encoded:
    """One example's cached positions, encoded (flat arrays over its positions)."""

    n_new: np.ndarray
    old_refs: np.ndarray
    new_ids: np.ndarray
    codes: np.ndarray
    log_mass: np.ndarray


class _Encoder:
    def __init__(self, codec: _Codec, vocab_size: int) -> None:
        self.codec = codec
        self.discovery = np.full(vocab_size, -1, dtype=np.int64)  # reset after each example

    def encode(self, ids: np.ndarray, logprobs: np.ndarray) -> _Encoded:
        """ids (n, k) int64, logprobs (n, k) float at the capture temperature, normalised over the vocabulary."""
        c = self.codec
        n, k = ids.shape
        lp = logprobs.astype(np.float64)
        if np.isnan(lp).any() or (lp == np.inf).any():
            raise ValueError("the teacher produced NaN or +inf log-probabilities")
        top = lp.max(axis=1, keepdims=True)  # finite: the top-1 of a distribution
        log_mass = np.minimum(top[:, 0] + np.log(np.exp(lp - top).sum(axis=1)), 0.0)
        order = np.argsort(ids, axis=1, kind="stable")
        ids_sorted = np.take_along_axis(ids, order, axis=1)
        codes = np.searchsorted(c.mids, np.take_along_axis(lp, order, axis=1)).astype(
            c.code_dtype
        )  # -inf -> 0

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
        return _Encoded(
            n_new=n_new.astype(c.count_dtype),
            old_refs=np.concatenate(olds).astype(c.id_dtype) if olds else np.zeros(0, c.id_dtype),
            new_ids=np.concatenate(news).astype(c.id_dtype) if news else np.zeros(0, c.id_dtype),
            codes=codes.reshape(-1),
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


def decode(codec: _Codec, parts: Sequence[_Encoded]) -> tuple[np.ndarray, np.ndarray]:
    """Decode examples, concatenated: ids (N, k) int64 and log-probs (N, k) float32 sorted descending."""
    k = codec.k
    n_new = np.concatenate([p.n_new for p in parts]).astype(np.int64)
    n_rows = n_new.size
    if n_rows == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    if (n_new > k).any():
        raise ValueError("n_new exceeds k")
    n_old = k - n_new
    new_abs = _segment_cumsum(np.concatenate([p.new_ids for p in parts]).astype(np.int64), n_new)
    old_rel = _segment_cumsum(np.concatenate([p.old_refs for p in parts]).astype(np.int64), n_old)
    # discovery numbers are per example: offset each example's references into the concatenated new ids
    ex_new = np.array([int(p.n_new.astype(np.int64).sum()) for p in parts], dtype=np.int64)
    ex_old = np.array([int(p.n_new.size * k - p.n_new.astype(np.int64).sum()) for p in parts], dtype=np.int64)
    ex_off = np.cumsum(ex_new) - ex_new
    ref = old_rel + np.repeat(ex_off, ex_old)
    if ref.size and (old_rel.min() < 0 or (old_rel >= np.repeat(ex_new, ex_old)).any()):
        raise ValueError("reference to an undiscovered id")
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


def _list_column(arrays: list[np.ndarray], dtype: pa.DataType) -> pa.Array:
    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    values = pa.array(np.concatenate(arrays) if arrays else np.zeros(0), dtype)
    if offsets[-1] >= 2**31:  # a huge shard: 64-bit offsets
        return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), pa.int32()), values)


_ARROW = {np.uint8: pa.uint8(), np.uint16: pa.uint16(), np.uint32: pa.uint32()}


def _shard_bytes(
    keys: list[str], starts: list[int], parts: list[_Encoded], codec: _Codec, level: int
) -> bytes:
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "start": pa.array(starts, pa.int32()),
            "length": pa.array([p.n_new.size for p in parts], pa.int32()),
            "n_new": _list_column([p.n_new for p in parts], _ARROW[codec.count_dtype]),
            "old_refs": _list_column([p.old_refs for p in parts], _ARROW[codec.id_dtype]),
            "new_ids": _list_column([p.new_ids for p in parts], _ARROW[codec.id_dtype]),
            "codes": _list_column([p.codes for p in parts], _ARROW[codec.code_dtype]),
            "log_mass": _list_column([p.log_mass for p in parts], pa.float16()),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        compression_level=level,
        use_dictionary=False,
        use_byte_stream_split=_SPLIT_COLUMNS,
        write_statistics=False,
        data_page_size=1 << 24,
        row_group_size=max(1, len(keys)),
    )
    return bytes(sink.getvalue().to_pybytes())


# ----------------------------------------------------------------------------------------------- writer


@dataclass
class _Item:
    key: str
    example: TokenizedExample
    start: int  # first cached position


def _plan(examples: list[TokenizedExample]) -> list[_Item]:
    """Distinct examples with answer tokens, in order. Duplicates (same token ids) are cached once, over
    the union of their answer positions."""
    items: dict[str, _Item] = {}
    for ex in examples:
        if len(ex.input_ids) - ex.prompt_len <= 0:
            continue
        key = example_key(ex.input_ids)
        start = max(ex.prompt_len - 1, 0)
        if key in items:
            items[key].start = min(items[key].start, start)
        else:
            items[key] = _Item(key=key, example=ex, start=start)
    return list(items.values())


def _fingerprint(items: list[_Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.key}:{it.start};".encode())
    return h.hexdigest()[:32]


def _topk_rows(
    sig: TeacherSignal | SparseTeacherSignal, k: int, temperature: float, chunk_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(sig, SparseTeacherSignal):
        if abs(sig.temperature - temperature) > 1e-9:
            raise CompatibilityError(
                f"the teacher's log-probs are at temperature {sig.temperature}, the cache asks for {temperature}"
            )
        if sig.ids.shape[1] < k:
            raise CompatibilityError(
                f"the teacher gives the top {sig.ids.shape[1]} tokens, the cache asks for k = {k}"
            )
        lp, order = sig.logprobs.float().sort(dim=-1, descending=True)
        ids = sig.ids.gather(-1, order)
        return ids[:, :k].cpu().numpy().astype(np.int64), lp[:, :k].cpu().numpy()
    ids_out: list[np.ndarray] = []
    lp_out: list[np.ndarray] = []
    for s in range(0, sig.num_rows, chunk_rows):
        e = min(s + chunk_rows, sig.num_rows)
        with torch.no_grad():
            logp = torch.log_softmax(sig.logits(s, e).float() / temperature, dim=-1)
            val, idx = logp.topk(k, dim=-1)
        ids_out.append(idx.cpu().numpy().astype(np.int64))
        lp_out.append(val.cpu().numpy())
    if not ids_out:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(ids_out), np.concatenate(lp_out)


def _teacher_topk(
    teacher: TeacherSource,
    items: list[_Item],
    *,
    k: int,
    temperature: float,
    vocab_size: int,
    batch_size: int,
    pad_id: int,
    chunk_rows: int,
    progress: _Progress | None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Top-k (ids, log-probs) at each item's cached positions, in item order."""
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: -len(items[i].example.input_ids))  # little padding
    examples = [it.example for it in items]
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = collate(examples, [[i] for i in idx], pad_id, packing=False)
        select = torch.zeros_like(batch.targets, dtype=torch.bool)
        counts = []
        for r, i in enumerate(idx):
            n = len(items[i].example.input_ids)
            select[r, items[i].start : n - 1] = True
            counts.append(n - 1 - items[i].start)
        sig = teacher.signal(batch, select)
        if sig.num_rows != sum(counts):
            raise CompatibilityError(
                f"the teacher returned {sig.num_rows} rows for {sum(counts)} selected positions"
            )
        if sig.vocab_size > vocab_size and isinstance(sig, TeacherSignal):
            raise CompatibilityError(
                f"the teacher's vocabulary ({sig.vocab_size}) exceeds vocab_size ({vocab_size})"
            )
        ids, lp = _topk_rows(sig, k, temperature, chunk_rows)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise CompatibilityError(
                f"the teacher returned token ids outside the vocabulary (size {vocab_size})"
            )
        at = 0
        for i, n in zip(idx, counts, strict=True):
            out[i] = (ids[at : at + n], lp[at : at + n])
            at += n
        if progress is not None:
            progress.advance(len(idx))
    assert all(o is not None for o in out)
    return [o for o in out if o is not None]


def write_cache(
    teacher: TeacherSource,
    examples: list[TokenizedExample],
    out_dir: Path,
    *,
    k: int,
    temperature: float,
    teacher_id: str,
    tokenizer_hash: str,
    vocab_size: int,
    shard_size: int = 512,
    batch_size: int = 8,
    value_step: float = DEFAULT_VALUE_STEP,
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
    pad_id: int = 0,
    chunk_rows: int = 256,
    progress: _Progress | None = None,
) -> Manifest:
    """Run `teacher` over the answer positions of `examples` and store the top-k in `out_dir`.

    Resumable: rerun with the same arguments after a crash and finished shards are verified and kept.
    A folder holding a cache made with other settings or data is refused (InputError).
    """
    if k < 1 or k > vocab_size:
        raise ValueError(f"k: must be in [1, vocab_size={vocab_size}], got {k}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = _plan(examples)
    if not items:
        raise InputError(f"{out_dir}: nothing to cache (no example has answer tokens)")
    encoding = _encoding(vocab_size, k, value_step, zstd_level)
    codec = _Codec.from_encoding(encoding, k, "write_cache")
    manifest = Manifest(
        teacher_id=teacher_id,
        tokenizer_hash=tokenizer_hash,
        k=k,
        temperature=float(temperature),
        vocab_size=vocab_size,
        encoding=encoding,
        shard_size=shard_size,
        data_fingerprint=_fingerprint(items),
        examples=len(items),
        num_shards=-(-len(items) // shard_size),
    )
    manifest.shards = _resumable_shards(out_dir, manifest, progress)
    for stale in out_dir.glob(".*.tmp"):  # left by a killed run
        stale.unlink(missing_ok=True)

    encoder = _Encoder(codec, vocab_size)

    def encode_and_write(
        shard: int, chunk: list[_Item], rows: list[tuple[np.ndarray, np.ndarray]]
    ) -> ShardInfo:
        parts = [encoder.encode(ids, lp) for ids, lp in rows]
        data = _shard_bytes([it.key for it in chunk], [it.start for it in chunk], parts, codec, zstd_level)
        name = f"shard-{shard:05d}.parquet"
        write_bytes_atomic(out_dir / name, data)
        tokens = int(sum(p.n_new.size for p in parts))
        return ShardInfo(
            file=name,
            examples=len(chunk),
            tokens=tokens,
            sha256=hashlib.sha256(data).hexdigest(),
            bytes=len(data),
        )

    def record(info: ShardInfo) -> None:  # the manifest lists a shard only once its file is durable
        manifest.shards.append(info)
        _update_totals(manifest)
        write_bytes_atomic(out_dir / MANIFEST, manifest.to_json().encode())

    done_examples = sum(s.examples for s in manifest.shards)
    if progress is not None:
        progress.start("caching teacher top-k", len(items))
        if done_examples:
            progress.log(f"resuming: {len(manifest.shards)} complete shard(s) kept in {out_dir}")
            progress.advance(done_examples)
    # Shard n is encoded, compressed and written in a worker thread while the teacher runs on shard n+1
    # (zstd releases the GIL); at most one shard is in flight.
    pending: Future[ShardInfo] | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-cache-writer") as pool:
        try:
            for shard in range(len(manifest.shards), manifest.num_shards):
                chunk = items[shard * shard_size : (shard + 1) * shard_size]
                rows = _teacher_topk(
                    teacher,
                    chunk,
                    k=k,
                    temperature=temperature,
                    vocab_size=vocab_size,
                    batch_size=batch_size,
                    pad_id=pad_id,
                    chunk_rows=chunk_rows,
                    progress=progress,
                )
                if pending is not None:
                    done, pending = pending, None
                    record(done.result())
                pending = pool.submit(encode_and_write, shard, chunk, rows)
            if pending is not None:
                done, pending = pending, None
                record(done.result())
        finally:
            if pending is not None:  # interrupted: keep the shard already handed to the writer
                with contextlib.suppress(Exception):
                    record(pending.result())
    if progress is not None:
        progress.finish()
    return manifest


def _update_totals(m: Manifest) -> None:
    m.total_tokens = sum(s.tokens for s in m.shards)
    m.total_bytes = sum(s.bytes for s in m.shards)
    m.bytes_per_token = round(m.total_bytes / m.total_tokens, 3) if m.total_tokens else 0.0
    m.complete = len(m.shards) == m.num_shards


def _resumable_shards(out_dir: Path, fresh: Manifest, progress: _Progress | None) -> list[ShardInfo]:
    """The complete, intact shards of an earlier run with the same settings (empty for a new folder)."""
    if not (out_dir / MANIFEST).exists():
        return []
    old = read_manifest(out_dir)
    theirs, ours = old.settings(), fresh.settings()
    for name, value in ours.items():
        if theirs[name] != value:
            raise InputError(
                f"{out_dir}: holds a cache made with a different {name}; write to another folder or delete it"
            )
    kept: list[ShardInfo] = []
    for info in old.shards:
        try:
            _verify_shard(out_dir, info)
        except InputError as err:
            if progress is not None:
                progress.log(f"recomputing from {info.file}: {err}")
            break
        kept.append(info)
    return kept


# ----------------------------------------------------------------------------------------------- reader


def _verify_shard(cache_dir: Path, info: ShardInfo) -> bytes:
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
class _Shard:
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

    def part(self, row: int) -> _Encoded:
        def sl(name: str) -> np.ndarray:
            off = self.offsets[name]
            return self.values[name][off[row] : off[row + 1]]

        return _Encoded(sl("n_new"), sl("old_refs"), sl("new_ids"), sl("codes"), sl("log_mass"))


def _parse_shard(path: Path, data: bytes, k: int) -> _Shard:
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
    return _Shard(keys=keys, starts=starts, lengths=lengths, values=values, offsets=offsets)


def verify_cache(cache_dir: Path) -> Manifest:
    """Check the manifest and every shard (size, sha256, readable); return the manifest."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    for info in manifest.shards:
        _parse_shard(cache_dir / info.file, _verify_shard(cache_dir, info), manifest.k)
    return manifest


def _sequences(batch: Batch, select: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each sequence with selected positions, row-major: (its token ids, selected indices within it).

    A batch row holds one sequence (padded batches: real tokens are where attention_mask is 1) or several
    (packed batches: position ids restart at each sequence)."""
    input_ids = batch.input_ids.detach().cpu()
    sel = select.detach().cpu().bool()
    pos = batch.position_ids.detach().cpu()
    mask = None if batch.attention_mask is None else batch.attention_mask.detach().cpu().bool()
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    bsz, width = sel.shape
    for b in range(bsz):
        if not bool(sel[b].any()):
            continue
        breaks = torch.ones(width, dtype=torch.bool)
        breaks[1:] = pos[b, 1:] != pos[b, :-1] + 1
        if mask is not None:
            breaks[1:] |= mask[b, 1:] != mask[b, :-1]
        bounds = [*torch.nonzero(breaks).flatten().tolist(), width]
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            chosen = torch.nonzero(sel[b, s:e]).flatten()
            if chosen.numel() == 0:
                continue
            if mask is not None and not bool(mask[b, s:e].all()):
                raise ValueError("selected positions on padding (attention_mask 0)")
            out.append((input_ids[b, s:e], chosen))
    return out


class CachedTeacherSource(TeacherSource):
    """Serve a cache written by `write_cache` as sparse teacher signals.

    `tokenizer_hash`, when given, must equal the one recorded at capture. Shards are opened (and their
    size and sha256 checked) when first needed. Opened shards (~3 bytes per cached id in memory) stay in an
    LRU of at most `memory_mb`; give it the cache's size or more when training visits examples in random
    order, so that no shard is read twice.
    """

    kind = "cache"

    def __init__(
        self, cache_dir: Path | str, *, tokenizer_hash: str | None = None, memory_mb: float = 2048.0
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(self.cache_dir)
        m = self.manifest
        if not m.complete or len(m.shards) != m.num_shards:
            raise InputError(
                f"{self.cache_dir}: cache is incomplete ({len(m.shards)} of {m.num_shards} shards); "
                "rerun `distill cache` with the same recipe to finish it"
            )
        if tokenizer_hash is not None and tokenizer_hash != m.tokenizer_hash:
            raise CompatibilityError(
                f"{self.cache_dir}: the cache was made with another tokenizer (content hash {m.tokenizer_hash}, "
                f"this run's is {tokenizer_hash})"
            )
        self.codec = _Codec.from_encoding(m.encoding, m.k, str(self.cache_dir / MANIFEST))
        self.k = m.k
        self.temperature = m.temperature
        self.vocab_size = m.vocab_size
        self.memory_bytes = int(memory_mb * 2**20)
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._open_bytes = 0
        self.shard_loads = (
            0  # how often a shard was read from disk (more than once per shard: raise memory_mb)
        )
        self._index: dict[str, tuple[int, int]] | None = None

    # -- shards
    def _shard(self, i: int) -> _Shard:
        shard = self._open.get(i)
        if shard is not None:
            self._open.move_to_end(i)
            return shard
        info = self.manifest.shards[i]
        data = _verify_shard(self.cache_dir, info)
        shard = _parse_shard(self.cache_dir / info.file, data, self.k)
        if len(shard.keys) != info.examples or int(shard.lengths.sum()) != info.tokens:
            raise InputError(
                f"{self.cache_dir / info.file}: cache shard disagrees with the manifest (counts)"
            )
        self.shard_loads += 1
        self._open[i] = shard
        self._open_bytes += shard.nbytes
        while self._open_bytes > self.memory_bytes and len(self._open) > 1:
            _, evicted = self._open.popitem(last=False)
            self._open_bytes -= evicted.nbytes
        return shard

    def index(self) -> dict[str, tuple[int, int]]:
        """key -> (shard, row), built on first use by opening (and verifying) every shard once."""
        if self._index is None:
            index: dict[str, tuple[int, int]] = {}
            for i in range(len(self.manifest.shards)):
                for row, key in enumerate(self._shard(i).keys):
                    index.setdefault(key, (i, row))
            self._index = index
        return self._index

    def __contains__(self, token_ids: Sequence[int] | torch.Tensor) -> bool:
        return example_key(token_ids) in self.index()

    def lookup(self, token_ids: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """All cached positions of one example: ids (n, k), log-probs (n, k), first position."""
        key = example_key(token_ids)
        where = self.index().get(key)
        if where is None:
            raise self._missing(key, len(token_ids))
        shard = self._shard(where[0])
        ids, lp = decode(self.codec, [shard.part(where[1])])
        return torch.from_numpy(ids), torch.from_numpy(lp), int(shard.starts[where[1]])

    def _missing(self, key: str, n: int) -> InputError:
        return InputError(
            f"{self.cache_dir}: an example ({n} tokens, key {key[:12]}) is not in the cache; was the cache made "
            "from different data, tokenizer, chat template, system prompt or max_length?"
        )

    # -- the TeacherSource interface
    def signal(self, batch: Batch, select: torch.Tensor) -> SparseTeacherSignal:
        index = self.index()
        parts: list[_Encoded] = []
        part_of: dict[tuple[int, int], int] = {}
        part_base: list[int] = []
        gather: list[np.ndarray] = []
        base = 0
        for seq, chosen in _sequences(batch, select):
            key = example_key(seq)
            where = index.get(key)
            if where is None:
                raise self._missing(key, int(seq.numel()))
            shard = self._shard(where[0])
            start, length = int(shard.starts[where[1]]), int(shard.lengths[where[1]])
            local = chosen.numpy().astype(np.int64) - start
            if local.size and (local.min() < 0 or local.max() >= length):
                raise InputError(
                    f"{self.cache_dir}: selected positions {int(chosen.min())}..{int(chosen.max())} of an example are "
                    f"not all cached (the cache holds answer positions {start}..{start + length - 1} only)"
                )
            p = part_of.get(where)
            if p is None:
                p = part_of[where] = len(parts)
                parts.append(shard.part(where[1]))
                part_base.append(base)
                base += length
            gather.append(part_base[p] + local)
        ids, lp = (
            decode(self.codec, parts)
            if parts
            else (np.zeros((0, self.k), np.int64), np.zeros((0, self.k), np.float32))
        )
        rows = np.concatenate(gather) if gather else np.zeros(0, np.int64)
        device = select.device
        expected = int(select.sum())
        if rows.size != expected:
            raise ValueError(f"cache rows ({rows.size}) do not match selected positions ({expected})")
        return SparseTeacherSignal(
            ids=torch.from_numpy(ids[rows]).to(device),
            logprobs=torch.from_numpy(lp[rows]).to(device),
            temperature=self.temperature,
            vocab_size=self.vocab_size,
        )

    def close(self) -> None:
        self._open.clear()
        self._open_bytes = 0
        self._index = None


__all__ = [
    "CachedTeacherSource",
    "Manifest",
    "ShardInfo",
    "decode",
    "example_key",
    "read_manifest",
    "value_levels",
    "verify_cache",
    "write_cache",
]
