"""Character-span alignment of two tokenizations against a naive reference: a cut exists where a prefix
of the tokens decodes to exactly the text's prefix, and chunks run between the cuts both sides share.
Tricky text: Unicode split across byte-level tokens, whitespace runs, byte-fallback tokens, a normaliser."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from distill.data.alignment import Chunk, align, cuts, token_spans
from distill.data.cross_tokenizer import pair_example
from distill.data.records import Example
from distill.errors import CompatibilityError

TRICKY = [
    "hello  world\n\nfoo",
    "naïve café 😀 日本語 and e\u0301 combining",
    "tabs\t\tand   runs of spaces\r\n\r\n  trailing  ",
    "Emoji family 👩‍👩‍👧 flags 🇫🇷, Arabic والعربية, zero\u200bwidth",
    "x",
    "The answer is 42. Then 3.14159 * 2 = 6.28318!",
]
CORPUS = [*TRICKY, "the quick brown fox jumps over the lazy dog " * 3, "hello world café naïve"] * 4


def byte_level_bpe(vocab: int, lowercase: bool = False) -> PreTrainedTokenizerBase:
    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def byte_fallback_bpe() -> PreTrainedTokenizerBase:
    """SentencePiece-style (Llama 2): spaces as '▁', characters outside the vocabulary as <0xNN> bytes."""
    letters = sorted(set("".join(CORPUS[:3]).replace(" ", "")) - set("😀日本語é"))
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for piece in ["▁", *letters, "he", "hel", "hell", "hello", "▁w", "▁wo"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("h", "e"), ("he", "l"), ("hel", "l"), ("hell", "o"), ("▁", "w"), ("▁w", "o")]
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, fuse_unk=False))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def tokenizers(smol_tokenizer_dir: Path) -> dict[str, PreTrainedTokenizerBase]:
    return {
        "smollm2": AutoTokenizer.from_pretrained(smol_tokenizer_dir),
        "bpe300": byte_level_bpe(300),
        "bpe600": byte_level_bpe(600),
        "byte_fallback": byte_fallback_bpe(),
        "lowercase": byte_level_bpe(400, lowercase=True),
    }


def naive_cut_points(
    tok: PreTrainedTokenizerBase, ids: list[int], text: str, same: Callable[[str], str]
) -> dict[int, int]:
    """{character position: tokens before it} wherever a token prefix decodes to exactly that much text."""
    out = {0: 0}
    for i in range(1, len(ids) + 1):
        prefix = tok.decode(ids[:i])
        if "\ufffd" not in prefix and same(text[: len(prefix)]) == prefix:
            out.setdefault(len(prefix), i)
    return out


def naive_align(
    tok_a: PreTrainedTokenizerBase, tok_b: PreTrainedTokenizerBase, text: str, same: Callable[[str], str]
) -> list[Chunk]:
    ids_a = tok_a(text, add_special_tokens=False).input_ids
    ids_b = tok_b(text, add_special_tokens=False).input_ids
    ca, cb = naive_cut_points(tok_a, ids_a, text, same), naive_cut_points(tok_b, ids_b, text, same)
    shared = sorted(set(ca) & set(cb))
    return [Chunk(ca[s], ca[e], cb[s], cb[e]) for s, e in zip(shared[:-1], shared[1:], strict=True)]


def chunks_of(tok_a: PreTrainedTokenizerBase, tok_b: PreTrainedTokenizerBase, text: str) -> list[Chunk]:
    _, a = token_spans(tok_a, text)
    _, b = token_spans(tok_b, text)
    return align(a, b, len(text))


PAIRS = [
    ("smollm2", "bpe300"),
    ("smollm2", "bpe600"),
    ("bpe300", "bpe600"),
    ("smollm2", "byte_fallback"),
    ("bpe600", "byte_fallback"),
]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("text", TRICKY)
def test_matches_naive_reference(
    tokenizers: dict[str, PreTrainedTokenizerBase], pair: tuple[str, str], text: str
) -> None:
    a, b = tokenizers[pair[0]], tokenizers[pair[1]]
    assert chunks_of(a, b, text) == naive_align(a, b, text, lambda s: s)


@pytest.mark.parametrize("text", TRICKY)
def test_normaliser_offsets_refer_to_the_original_text(
    tokenizers: dict[str, PreTrainedTokenizerBase], text: str
) -> None:
    """A lowercasing tokenizer decodes to other text; its offsets still point into the original, so the
    alignment equals the reference computed on lowercased text."""
    a, b = tokenizers["smollm2"], tokenizers["lowercase"]
    got = chunks_of(a, b, text)
    ids_a = a(text, add_special_tokens=False).input_ids
    ids_b = b(text, add_special_tokens=False).input_ids
    ca = naive_cut_points(a, ids_a, text, lambda s: s)
    cb = naive_cut_points(b, ids_b, text, str.lower)
    shared = sorted(set(ca) & set(cb))
    assert got == [Chunk(ca[s], ca[e], cb[s], cb[e]) for s, e in zip(shared[:-1], shared[1:], strict=True)]


@settings(max_examples=40, deadline=None)
# SmolLM2's vocabulary lacks some control bytes and the lead bytes 0xF1-0xF7: it drops those characters
@given(st.text(alphabet=st.characters(max_codepoint=0x3FFFF, exclude_categories=["Cs", "Cc"]), max_size=40))
def test_chunks_partition_both_sides_and_cover_the_same_text(text: str) -> None:
    a, b = TOKS["smollm2"], TOKS["bpe300"]
    ids_a, spans_a = token_spans(a, text)
    ids_b, spans_b = token_spans(b, text)
    chunks = align(spans_a, spans_b, len(text))
    if not ids_a:
        assert chunks == []
        return
    assert chunks[0].a_start == 0 and chunks[0].b_start == 0
    assert chunks[-1].a_end == len(ids_a) and chunks[-1].b_end == len(ids_b)
    for prev, nxt in zip(chunks[:-1], chunks[1:], strict=True):
        assert prev.a_end == nxt.a_start and prev.b_end == nxt.b_start
    for c in chunks:
        assert c.a_end > c.a_start and c.b_end > c.b_start
        assert a.decode(ids_a[c.a_start : c.a_end]) == b.decode(ids_b[c.b_start : c.b_end])


TOKS: dict[str, PreTrainedTokenizerBase] = {}


@pytest.fixture(autouse=True, scope="module")
def _share(tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    TOKS.update(tokenizers)  # hypothesis tests cannot take function-scoped fixtures


def test_cuts_with_a_gap_and_an_overlap() -> None:
    # token 1 overlaps token 2 (one character split in bytes); a gap of 2 characters before token 3
    spans = [(0, 2), (2, 4), (3, 4), (6, 8)]
    assert cuts(spans, 8) == [(0, 0, 0), (1, 2, 2), (3, 4, 6), (4, 8, 8)]
    # the cut interval [4, 6] (after 3 tokens) matches the other side's point cut at 5
    assert align(spans, [(0, 5), (5, 8)], 8) == [Chunk(0, 3, 0, 1), Chunk(3, 4, 1, 2)]
    assert align([], [(0, 1)], 1) == []


def test_slow_tokenizer_is_refused() -> None:
    class Slow:
        is_fast = False

    with pytest.raises(CompatibilityError, match="fast tokenizer"):
        token_spans(Slow(), "text")  # type: ignore[arg-type]


def test_pair_example_keeps_whole_chunks(tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    a, b = tokenizers["bpe300"], tokenizers["smollm2"]
    b.eos_token = "<|im_end|>"
    a.add_special_tokens({"eos_token": "<|im_end|>"})
    ex = Example(
        [{"role": "user", "content": "hi"}], "hello world, naïve café 😀 and more text here", {}, True
    )
    full = pair_example(a, b, ex, 512, None)
    assert full is not None
    assert (
        full.chunks[-1].a_end == full.num_loss_tokens
        and full.chunks[-1].b_end == full.teacher.num_loss_tokens
    )
    assert full.answer_bytes == len(ex.completion.encode())  # type: ignore[union-attr]
    longest = max(full.prompt_len, full.teacher.prompt_len)
    cut = pair_example(a, b, ex, longest + 5, None)
    assert cut is not None and len(cut.chunks) < len(full.chunks)
    assert cut.chunks == full.chunks[: len(cut.chunks)]
    assert cut.num_loss_tokens <= 5 + longest - cut.prompt_len
    assert cut.teacher.num_loss_tokens <= 5 + longest - cut.teacher.prompt_len
    assert a.decode(cut.input_ids[cut.prompt_len :]) == b.decode(
        cut.teacher.input_ids[cut.teacher.prompt_len :]
    )
    assert 0 < cut.answer_bytes < full.answer_bytes
    assert pair_example(a, b, ex, longest, None) is None  # no room for any answer
