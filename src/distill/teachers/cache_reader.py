"""Read a teacher cache back: `CachedTeacherSource` serves any batch as a `SparseTeacherSignal`, and
`verify_cache` checks a whole cache.

The reader splits each batch row into its sequences (`Batch.sequences`), hashes each and looks it up by
that key, so nothing depends on batch order, batch size, packing or process count. Each shard's size and
sha256 are checked when it is first opened; a missing, truncated, corrupted or unreadable shard is an
`InputError` naming the file, and a tokenizer other than the one the cache was made with is a
`CompatibilityError`. Format: `cache_format`; measurements: ``docs/cache-encoding.md``.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from distill.data.batching import Batch
from distill.errors import CompatibilityError, InputError
from distill.teachers.base import SparseTeacherSignal, TeacherSource
from distill.teachers.cache_format import (
    MANIFEST,
    Codec,
    Encoded,
    Manifest,
    Shard,
    decode,
    example_key,
    parse_shard,
    read_manifest,
    verify_shard,
)


def verify_cache(cache_dir: Path) -> Manifest:
    """Check the manifest and every shard (size, sha256, readable); return the manifest."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    for info in manifest.shards:
        parse_shard(cache_dir / info.file, verify_shard(cache_dir, info), manifest.k)
    return manifest


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
        self.codec = Codec.from_encoding(m.encoding, m.k, str(self.cache_dir / MANIFEST))
        self.k = m.k
        self.temperature = m.temperature
        self.vocab_size = m.vocab_size
        self.memory_bytes = int(memory_mb * 2**20)
        self._open: OrderedDict[int, Shard] = OrderedDict()
        self._open_bytes = 0
        self.shard_loads = (
            0  # how often a shard was read from disk (more than once per shard: raise memory_mb)
        )
        self._index: dict[str, tuple[int, int]] | None = None

    # -- shards
    def _shard(self, i: int) -> Shard:
        shard = self._open.get(i)
        if shard is not None:
            self._open.move_to_end(i)
            return shard
        info = self.manifest.shards[i]
        data = verify_shard(self.cache_dir, info)
        shard = parse_shard(self.cache_dir / info.file, data, self.k)
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

    def _missing(self, key: str, n: int) -> InputError:
        return InputError(
            f"{self.cache_dir}: an example ({n} tokens, key {key[:12]}) is not in the cache; was the cache made "
            "from different data, tokenizer, chat template, system prompt or max_length?"
        )

    # -- the TeacherSource interface
    def signal(self, batch: Batch, select: torch.Tensor) -> SparseTeacherSignal:
        index = self.index()
        input_ids = batch.input_ids.detach().cpu()
        parts: list[Encoded] = []
        part_of: dict[tuple[int, int], int] = {}
        part_base: list[int] = []
        gather: list[np.ndarray] = []
        base = 0
        for span in batch.sequences(select):
            seq = input_ids[span.row, span.start : span.end]
            key = example_key(seq)
            where = index.get(key)
            if where is None:
                raise self._missing(key, int(seq.numel()))
            shard = self._shard(where[0])
            start, length = int(shard.starts[where[1]]), int(shard.lengths[where[1]])
            chosen = np.asarray(span.selected, dtype=np.int64)
            local = chosen - start
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
            decode(self.codec, parts, str(self.cache_dir))
            if parts
            else (np.zeros((0, self.k), np.int64), np.zeros((0, self.k), np.float32))
        )
        rows = np.concatenate(gather) if gather else np.zeros(0, np.int64)
        device = select.device
        expected = int(select.sum())
        if rows.size != expected:  # an internal invariant: never hand back misaligned rows
            raise CompatibilityError(f"cache rows ({rows.size}) do not match selected positions ({expected})")
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


__all__ = ["CachedTeacherSource", "verify_cache"]
