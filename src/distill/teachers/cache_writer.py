"""Write a teacher cache: run a teacher (live model, or any sparse source such as a server) once over
tokenised examples and store, for every answer position (where the target is not -100), the top-k token
ids, their log-probabilities at the capture temperature, and the mass the top-k leave out.

Resume. Shards hold a fixed, deterministic run of examples; each shard and then the manifest are written
atomically (`distill.io`). A killed run, restarted with the same arguments, verifies the shards the
manifest lists (sha256), keeps them and recomputes from the first missing one. The format itself is in
`cache_format`; why it looks the way it does is in ``docs/cache-encoding.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distill.data.batching import collate
from distill.data.tokenize import TokenizedExample
from distill.errors import CompatibilityError, InputError, RecipeError
from distill.io import write_bytes_atomic
from distill.progress import Progress
from distill.teachers.base import SparseTeacherSignal, TeacherSignal, TeacherSource
from distill.teachers.cache_format import (
    DEFAULT_VALUE_STEP,
    DEFAULT_ZSTD_LEVEL,
    MANIFEST,
    SPLIT_COLUMNS,
    Codec,
    Encoded,
    Encoder,
    Manifest,
    ShardInfo,
    encoding_block,
    example_key,
    read_manifest,
    verify_shard,
)

# ------------------------------------------------------------------------------------------ shard files


def _list_column(arrays: list[np.ndarray], dtype: pa.DataType) -> pa.Array:
    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    values = pa.array(np.concatenate(arrays) if arrays else np.zeros(0), dtype)
    if offsets[-1] >= 2**31:  # a huge shard: 64-bit offsets
        return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), pa.int32()), values)


_ARROW = {np.uint8: pa.uint8(), np.uint16: pa.uint16(), np.uint32: pa.uint32()}


def _shard_bytes(keys: list[str], starts: list[int], parts: list[Encoded], codec: Codec, level: int) -> bytes:
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
        use_byte_stream_split=SPLIT_COLUMNS,
        write_statistics=False,
        data_page_size=1 << 24,
        row_group_size=max(1, len(keys)),
    )
    return bytes(sink.getvalue().to_pybytes())


# --------------------------------------------------------------------------------------- the teacher's top-k


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
    progress: Progress | None,
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


# ------------------------------------------------------------------------------------------------ writing


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
    progress: Progress | None = None,
) -> Manifest:
    """Run `teacher` over the answer positions of `examples` and store the top-k in `out_dir`.

    Resumable: rerun with the same arguments after a crash and finished shards are verified and kept.
    A folder holding a cache made with other settings or data is refused (InputError).
    """
    if k < 1 or k > vocab_size:
        raise RecipeError(f"cache.k: must be in [1, vocab_size={vocab_size}], got {k}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise RecipeError(f"cache.temperature: must be a finite number > 0, got {temperature!r}")
    if shard_size < 1 or batch_size < 1:
        raise RecipeError("cache.shard_size and cache.batch_size must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = _plan(examples)
    if not items:
        raise InputError(f"{out_dir}: nothing to cache (no example has answer tokens)")
    encoding = encoding_block(vocab_size, k, value_step, zstd_level)
    codec = Codec.from_encoding(encoding, k, "write_cache")
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

    encoder = Encoder(codec, vocab_size)

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


def _resumable_shards(out_dir: Path, fresh: Manifest, progress: Progress | None) -> list[ShardInfo]:
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
            verify_shard(out_dir, info)
        except InputError as err:
            if progress is not None:
                progress.log(f"recomputing from {info.file}: {err}")
            break
        kept.append(info)
    return kept


__all__ = ["write_cache"]
