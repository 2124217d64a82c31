"""The offline top-k cache: round trip against the live teacher, shuffle safety (identity keys, any batching
or packing), integrity errors naming the shard, resume after a kill, manifest, `datasets` readability."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.data.batching import IGNORE, Batch, collate, plan_batches
from distill.data.tokenize import TokenizedExample
from distill.errors import CompatibilityError, InputError
from distill.teachers.base import SparseTeacherSignal, TeacherSignal, TeacherSource
from distill.teachers.cache_format import MANIFEST, Codec, Encoder, decode, encoding_block, read_manifest
from distill.teachers.cache_reader import CachedTeacherSource, verify_cache
from distill.teachers.cache_writer import write_cache
from distill.teachers.live import LiveTeacherSource
from tests.conftest import tiny_llama

VOCAB = 500
K = 16


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def teacher() -> LiveTeacherSource:
    model = tiny_llama(vocab=VOCAB, layers=2, hidden=32, seed=1)
    with torch.no_grad():  # sharpen the random model so distributions look like a real teacher's
        model.model.norm.weight.mul_(14.0)  # top-1 ~0.66, top-16 mass ~0.8
    return LiveTeacherSource(model, VOCAB)


def make_examples(n: int = 14, seed: int = 0) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 30, (1,), generator=g))
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append(
            TokenizedExample(torch.randint(3, VOCAB, (length,), generator=g).tolist(), prompt_len=prompt)
        )
    return out


def cache_kwargs(**over: object) -> dict:
    kw: dict = dict(
        k=K,
        temperature=1.0,
        teacher_id="tiny",
        tokenizer_hash="tok123",
        vocab_size=VOCAB,
        shard_size=4,
        batch_size=3,
    )
    kw.update(over)
    return kw


@pytest.fixture(scope="module")
def built(
    teacher: LiveTeacherSource, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[TokenizedExample]]:
    exs = make_examples()
    folder = tmp_path_factory.mktemp("cache")
    write_cache(teacher, exs, folder, **cache_kwargs())
    return folder, exs


def live_topk(
    teacher: LiveTeacherSource, batch: Batch, select: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    sig = teacher.signal(batch, select)
    assert isinstance(sig, TeacherSignal)
    lp = torch.log_softmax(sig.logits(0, sig.num_rows).double() / temperature, -1)
    val, idx = lp.topk(K, -1)
    return idx, val


def kl_rows(p_lp: torch.Tensor, q_lp: torch.Tensor) -> torch.Tensor:
    """KL over the k categories plus one tail category (1 - top-k mass), i.e. the distribution kept."""

    def with_tail(lp: torch.Tensor) -> torch.Tensor:
        tail = (1 - lp.double().exp().sum(-1, keepdim=True)).clamp_min(1e-30)
        return torch.cat([lp.double(), tail.log()], -1)

    p, q = with_tail(p_lp), with_tail(q_lp)
    return (p.exp() * (p - q)).sum(-1)


def aligned(sig: SparseTeacherSignal, ids: torch.Tensor) -> torch.Tensor:
    """The cached log-probs re-ordered to the ids order of `ids` (same id sets required)."""
    a, oa = sig.ids.sort(-1)
    b, ob = ids.sort(-1)
    assert torch.equal(a, b), "cached top-k ids differ from the live teacher's"
    lp_by_id = sig.logprobs.double().gather(-1, oa)
    inv = ob.argsort(-1)
    return lp_by_id.gather(-1, inv)


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_round_trip_matches_live_topk(teacher: LiveTeacherSource, tmp_path: Path, temperature: float) -> None:
    exs = make_examples(8, seed=3)
    write_cache(teacher, exs, tmp_path, **cache_kwargs(temperature=temperature))
    src = CachedTeacherSource(tmp_path, tokenizer_hash="tok123")
    batch = collate(exs, [[i] for i in range(len(exs))], pad_id=0, packing=False)
    select = batch.targets != IGNORE
    sig = src.signal(batch, select)
    ids, exact = live_topk(teacher, batch, select, temperature)
    assert sig.temperature == temperature and sig.vocab_size == VOCAB
    assert sig.ids.dtype == torch.int64 and sig.logprobs.dtype == torch.float32
    assert sig.num_rows == int(select.sum())
    assert (sig.logprobs[:, :-1] >= sig.logprobs[:, 1:]).all(), "log-probs must be sorted descending"
    got = aligned(sig, ids)
    # the kept distribution (top-k + tail) is preserved up to the quantisation (KL well under 1e-3) ...
    assert kl_rows(exact, got).max() < 1e-3
    assert kl_rows(exact, got).mean() < 3e-4
    # ... and the tail mass is kept to float16 precision
    tail_exact = 1 - exact.exp().sum(-1)
    assert torch.allclose(sig.tail_mass().double(), tail_exact.clamp_min(0), atol=2e-3)


def test_fine_value_step_is_near_exact(teacher: LiveTeacherSource, tmp_path: Path) -> None:
    exs = make_examples(6, seed=4)
    write_cache(teacher, exs, tmp_path, **cache_kwargs(value_step=0.0005))
    assert read_manifest(tmp_path).encoding["values"]["dtype"] == "uint16"
    batch = collate(exs, [[i] for i in range(len(exs))], pad_id=0, packing=False)
    select = batch.targets != IGNORE
    sig = CachedTeacherSource(tmp_path).signal(batch, select)
    ids, exact = live_topk(teacher, batch, select)
    got = aligned(sig, ids)
    half_step = 0.0005 * torch.exp(-exact / 2) / 2  # the codebook is uniform in sqrt(p)
    assert ((got - exact).abs() <= 1.2 * half_step + 1e-4).all()
    assert kl_rows(exact, got).max() < 1e-5


def test_codec_round_trip_large_vocab_exact_ids() -> None:
    """ids above 65535 (uint32 columns), duplicates across positions, -inf log-probs: ids come back exactly."""
    vocab, k = 152_064, 8
    rng = np.random.default_rng(0)
    enc = encoding_block(vocab, k, 0.02, 3)
    assert enc["id_dtype"] == "uint32"
    codec = Codec.from_encoding(enc, k, "test")
    encoder = Encoder(codec, vocab)
    parts, truth = [], []
    for n in (5, 1, 9):
        pool = rng.choice(vocab, size=20, replace=False)  # positions share candidates, like a real teacher
        ids = np.stack([rng.choice(pool, size=k, replace=False) for _ in range(n)])
        logits = rng.normal(size=(n, 40)) * 3
        lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        lp = -np.sort(-lp, axis=1)[:, :k]
        lp[0, -1] = -np.inf
        parts.append(encoder.encode(ids, lp))
        truth.append((ids, lp))
    ids_d, lp_d = decode(codec, parts)
    ids_t = np.concatenate([t[0] for t in truth])
    assert np.array_equal(np.sort(ids_d, 1), np.sort(ids_t, 1))
    assert np.isfinite(lp_d).all() and (np.diff(lp_d, axis=1) <= 0).all()


# -------------------------------------------------------------------------------------- shuffle safety


def per_position(
    src: CachedTeacherSource, exs: list[TokenizedExample], plan: list[list[list[int]]], packing: bool
) -> dict:
    """(example, position) -> (ids, log-probs) as served for this batching."""
    out: dict = {}
    for rows in plan:
        batch = collate(exs, rows, pad_id=0, packing=packing)
        select = batch.targets != IGNORE
        sig = src.signal(batch, select)
        r = 0
        for row in rows:  # rows are served row-major: batch row by batch row, sequences in order
            for i in row:
                for pos in range(exs[i].prompt_len - 1, len(exs[i].input_ids) - 1):
                    out[(i, pos)] = (sig.ids[r].tolist(), sig.logprobs[r].tolist())
                    r += 1
        assert r == sig.num_rows
    return out


def test_shuffle_safe_any_order_batch_size_and_packing(built: tuple[Path, list[TokenizedExample]]) -> None:
    folder, exs = built
    src = CachedTeacherSource(folder, memory_mb=0.0)  # one shard at a time: eviction and reloads
    lengths = [len(e.input_ids) for e in exs]
    ref = per_position(src, exs, [[[i]] for i in range(len(exs))], packing=False)
    assert len(ref) == sum(e.num_loss_tokens for e in exs)
    for seed, bsz, packing in [(1, 3, False), (2, 5, False), (3, 4, True), (4, 2, True)]:
        plan = plan_batches(lengths, bsz, seed=seed, epoch=0, packing=packing, max_length=64)
        assert per_position(src, exs, plan, packing) == ref
    assert src.shard_loads > 8


def test_signal_subset_of_positions(built: tuple[Path, list[TokenizedExample]]) -> None:
    folder, exs = built
    src = CachedTeacherSource(folder)
    batch = collate(exs[:3], [[0], [1], [2]], pad_id=0, packing=False)
    full = src.signal(batch, batch.targets != IGNORE)
    every_other = (batch.targets != IGNORE) & (torch.arange(batch.targets.shape[1]) % 2 == 0)
    part = src.signal(batch, every_other)
    keep = every_other[batch.targets != IGNORE]
    assert torch.equal(part.ids, full.ids[keep]) and torch.equal(part.logprobs, full.logprobs[keep])


def test_unknown_example_and_uncached_positions_are_named(built: tuple[Path, list[TokenizedExample]]) -> None:
    folder, exs = built
    src = CachedTeacherSource(folder)
    other = TokenizedExample([7, 8, 9, 10, 11, 12], prompt_len=2)
    batch = collate([exs[0], other], [[0], [1]], pad_id=0, packing=False)
    with pytest.raises(InputError, match="not in the cache"):
        src.signal(batch, batch.targets != IGNORE)
    i = next(i for i, e in enumerate(exs) if e.prompt_len > 1)
    batch = collate(exs, [[i]], pad_id=0, packing=False)
    prompt_too = torch.zeros_like(batch.targets, dtype=torch.bool)
    prompt_too[0, : len(exs[i].input_ids) - 1] = True  # loss on the prompt too: not cached
    with pytest.raises(InputError, match="not all cached"):
        src.signal(batch, prompt_too)


def test_tokenizer_mismatch(built: tuple[Path, list[TokenizedExample]]) -> None:
    with pytest.raises(CompatibilityError, match="another tokenizer"):
        CachedTeacherSource(built[0], tokenizer_hash="different")


# ------------------------------------------------------------------------------------------ integrity


def copy_cache(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_corrupted_shard_is_named(built: tuple[Path, list[TokenizedExample]], tmp_path: Path) -> None:
    folder = copy_cache(built[0], tmp_path / "c")
    shard = folder / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"shard-00001\.parquet.*corrupted"):
        CachedTeacherSource(folder).index()
    with pytest.raises(InputError, match=r"shard-00001\.parquet"):
        verify_cache(folder)


def test_truncated_and_missing_shards_are_named(
    built: tuple[Path, list[TokenizedExample]], tmp_path: Path
) -> None:
    folder = copy_cache(built[0], tmp_path / "c")
    shard = folder / "shard-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"shard-00002\.parquet.*truncated"):
        CachedTeacherSource(folder).index()
    shard.unlink()
    with pytest.raises(InputError, match=r"shard-00002\.parquet.*missing"):
        verify_cache(folder)


def test_unreadable_shard_with_matching_checksum_is_named(
    built: tuple[Path, list[TokenizedExample]], tmp_path: Path
) -> None:
    import hashlib

    folder = copy_cache(built[0], tmp_path / "c")
    garbage = b"not a parquet file" * 10
    (folder / "shard-00000.parquet").write_bytes(garbage)
    m = json.loads((folder / MANIFEST).read_text())
    m["shards"][0].update(sha256=hashlib.sha256(garbage).hexdigest(), bytes=len(garbage))
    (folder / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(InputError, match=r"shard-00000\.parquet.*unreadable"):
        CachedTeacherSource(folder).index()


def test_corrupt_manifest_is_named(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text('{"format_version": 1, "shards": [')
    with pytest.raises(InputError, match="manifest"):
        CachedTeacherSource(tmp_path)
    with pytest.raises(InputError, match="no cache manifest"):
        CachedTeacherSource(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- resume


class FlakyTeacher(TeacherSource):
    """Counts calls; raises on call number `fail_at` (a kill in the middle of a shard)."""

    def __init__(self, inner: TeacherSource, fail_at: int | None = None) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def signal(self, batch: Batch, select: torch.Tensor) -> TeacherSignal | SparseTeacherSignal:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return self.inner.signal(batch, select)


def test_killed_run_resumes_from_last_complete_shard(
    teacher: LiveTeacherSource, built: tuple[Path, list[TokenizedExample]], tmp_path: Path
) -> None:
    reference, exs = built  # same examples and settings, written without interruption
    # 14 examples, 4 per shard, 3 per batch: shards take 2, 2, 2, 1 teacher calls; die in shard 2
    with pytest.raises(KeyboardInterrupt):
        write_cache(FlakyTeacher(teacher, fail_at=6), exs, tmp_path, **cache_kwargs())
    partial = read_manifest(tmp_path)
    assert [s.file for s in partial.shards] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert not partial.complete
    with pytest.raises(InputError, match="incomplete"):
        CachedTeacherSource(tmp_path)
    (tmp_path / ".shard-00002.parquet.tmp").write_bytes(b"half a shard")  # what a kill mid-write leaves

    again = FlakyTeacher(teacher)
    final = write_cache(again, exs, tmp_path, **cache_kwargs())
    assert again.calls == 3, "complete shards must be kept, only shards 2 and 3 recomputed"
    assert final.complete and not list(tmp_path.glob(".*.tmp"))
    ref = read_manifest(reference)
    assert [(s.file, s.sha256) for s in final.shards] == [(s.file, s.sha256) for s in ref.shards]

    # a damaged complete shard is recomputed on the next run; other settings are refused
    shard = tmp_path / "shard-00003.parquet"
    shard.write_bytes(shard.read_bytes()[:50])
    again = FlakyTeacher(teacher)
    write_cache(again, exs, tmp_path, **cache_kwargs())
    assert again.calls == 1
    verify_cache(tmp_path)
    with pytest.raises(InputError, match="different k"):
        write_cache(teacher, exs, tmp_path, **cache_kwargs(k=8))
    with pytest.raises(InputError, match="different data_fingerprint"):
        write_cache(teacher, exs[:-1], tmp_path, **cache_kwargs())


def test_sparse_source_gives_the_same_cache(
    teacher: LiveTeacherSource, built: tuple[Path, list[TokenizedExample]], tmp_path: Path
) -> None:
    class TopK(TeacherSource):  # what a served teacher returns: more than k, at temperature 1
        def signal(self, batch: Batch, select: torch.Tensor) -> SparseTeacherSignal:
            sig = teacher.signal(batch, select)
            assert isinstance(sig, TeacherSignal)
            val, idx = torch.log_softmax(sig.logits(0, sig.num_rows).float(), -1).topk(K + 4, -1)
            return SparseTeacherSignal(ids=idx, logprobs=val, temperature=1.0, vocab_size=VOCAB)

    reference, exs = built
    write_cache(TopK(), exs, tmp_path, **cache_kwargs())
    src_a, src_b = CachedTeacherSource(reference), CachedTeacherSource(tmp_path)
    batch = collate(exs, [[i] for i in range(len(exs))], pad_id=0, packing=False)
    a = src_a.signal(batch, batch.targets != IGNORE)
    b = src_b.signal(batch, batch.targets != IGNORE)
    assert torch.equal(a.ids, b.ids) and torch.allclose(a.logprobs, b.logprobs, atol=1e-6)
    with pytest.raises(CompatibilityError, match="temperature"):
        write_cache(TopK(), exs, tmp_path / "t2", **cache_kwargs(temperature=2.0))


# ----------------------------------------------------------------------------------- manifest, datasets


def test_manifest_fields(built: tuple[Path, list[TokenizedExample]]) -> None:
    folder, exs = built
    m = json.loads((folder / MANIFEST).read_text())
    for key in (
        "format_version",
        "teacher_id",
        "tokenizer_hash",
        "k",
        "temperature",
        "vocab_size",
        "encoding",
        "shards",
        "total_tokens",
        "total_bytes",
        "bytes_per_token",
        "complete",
        "data_fingerprint",
    ):
        assert key in m, key
    assert (m["teacher_id"], m["tokenizer_hash"], m["k"], m["temperature"]) == ("tiny", "tok123", K, 1.0)
    assert m["complete"] and len(m["shards"]) == 4
    assert m["total_tokens"] == sum(e.num_loss_tokens for e in exs)
    for s in m["shards"]:
        assert set(s) == {"file", "examples", "tokens", "sha256", "bytes"}
        assert (folder / s["file"]).stat().st_size == s["bytes"]
    assert m["bytes_per_token"] == pytest.approx(m["total_bytes"] / m["total_tokens"], rel=1e-3)
    assert m["encoding"]["values"]["codebook"] == "sqrt"


def test_shards_readable_by_datasets(built: tuple[Path, list[TokenizedExample]], tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder, exs = built
    files = sorted(str(p) for p in folder.glob("shard-*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path))
    assert ds.num_rows == len(exs)
    row = ds[0]
    assert len(row["n_new"]) == row["length"] and len(row["codes"]) == row["length"] * K
    assert len(row["key"]) == 32
