"""A student tokenizer of its own: byte-level BPE trained on the training text (lossless on any text,
deterministic, carrying the teacher's specials and chat template), and embedding transplantation (each new
row starts from the teacher rows of the same text)."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import processors
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from distill.errors import RecipeError
from distill.models.tokenizer_transplant import (
    byte_alphabet,
    byte_level_bytes,
    greedy_byte_match,
    teacher_byte_pieces,
    train_bpe,
    transplant_embeddings,
)
from tests.conftest import tiny_llama

QUICKSTART = Path(__file__).parents[2] / "src/distill/recipes/data/quickstart_train.jsonl"
TRICKY = [
    "Emoji 😀 and a family 👩‍👩‍👧, flags 🇫🇷!",
    "中文字符与日本語のテキスト، والعربية",
    "combining e\u0301 a\u0300\u0301 and precomposed é",
    "tabs\tand\t\ttabs, runs of     spaces,\r\nwindows lines\r\n\n\n  trailing  ",
    "  leading spaces, <|im_start|> inside text, and \x00\x7f control bytes \u200b",
    "spaces before punctuation , . ? ! and it 's , don 't",
    "",
]


def training_texts() -> list[str]:
    prompts = [json.loads(line)["prompt"] for line in QUICKSTART.read_text().splitlines() if line.strip()]
    return prompts + ["Un café 😀 中文 naïve façade"] * 5


@pytest.fixture(scope="module")
def teacher_tok(smol_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


@pytest.fixture(scope="module")
def new_tok(teacher_tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    return train_bpe(training_texts(), 1000, like=teacher_tok)


# --- train_bpe ------------------------------------------------------------------------------------


def test_bpe_has_the_size_specials_and_chat_template_of_the_teacher(
    teacher_tok: PreTrainedTokenizerBase, new_tok: PreTrainedTokenizerBase
) -> None:
    assert len(new_tok) == 1000
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(new_tok, role) == getattr(teacher_tok, role)
    specials = [str(t) for t in teacher_tok.added_tokens_decoder.values() if t.special]
    assert len(specials) == 17 and new_tok.convert_ids_to_tokens(list(range(17))) == specials
    assert new_tok.chat_template == teacher_tok.chat_template
    conversation = [
        {"role": "user", "content": "Why is the sky blue? 😀"},
        {"role": "assistant", "content": "Rayleigh."},
    ]
    text = new_tok.apply_chat_template(conversation, tokenize=False)
    assert text == teacher_tok.apply_chat_template(conversation, tokenize=False)
    ids = new_tok(text, add_special_tokens=False).input_ids
    start, end = new_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(start) == text.count("<|im_start|>") == 3 and ids.count(end) == 3
    assert new_tok.decode(ids) == text
    assert new_tok(text).input_ids == ids  # like the teacher, no bos/eos added to plain text


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_text_round_trips(new_tok: PreTrainedTokenizerBase, text: str) -> None:
    enc = new_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert new_tok.decode(enc.input_ids) == text
    assert len(enc["offset_mapping"]) == len(enc.input_ids)
    assert all(0 <= a <= b <= len(text) for a, b in enc["offset_mapping"])


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=40))
def test_any_text_round_trips(new_tok: PreTrainedTokenizerBase, text: str) -> None:
    ids = new_tok(text, add_special_tokens=False).input_ids
    assert new_tok.unk_token_id not in ids or "<|endoftext|>" in text
    assert new_tok.decode(ids) == text


def test_training_is_deterministic(
    teacher_tok: PreTrainedTokenizerBase, new_tok: PreTrainedTokenizerBase
) -> None:
    again = train_bpe(iter(training_texts()), 1000, like=teacher_tok, seed=7)
    assert again.get_vocab() == new_tok.get_vocab()
    assert (
        json.loads(again.backend_tokenizer.to_str())["model"]["merges"]
        == json.loads(new_tok.backend_tokenizer.to_str())["model"]["merges"]
    )


def test_saves_and_loads(new_tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    new_tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == new_tok.get_vocab()
    assert loaded.chat_template == new_tok.chat_template
    assert (loaded.eos_token, loaded.pad_token, loaded.bos_token) == (
        new_tok.eos_token,
        new_tok.pad_token,
        new_tok.bos_token,
    )
    for text in TRICKY:
        assert (
            loaded(text, add_special_tokens=False).input_ids
            == new_tok(text, add_special_tokens=False).input_ids
        )


def test_too_small_a_vocabulary_is_one_line(teacher_tok: PreTrainedTokenizerBase) -> None:
    with pytest.raises(RecipeError, match=r"student\.tokenizer\.vocab_size .* 273") as err:
        train_bpe(["some text"], 272, like=teacher_tok)
    assert "\n" not in str(err.value)
    assert len(train_bpe(["aa bb"], 273, like=teacher_tok)) == 273  # the bytes and specials alone


def test_a_teacher_template_adding_bos_is_carried_over(smol_tokenizer_dir: Path) -> None:
    teacher = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    teacher.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B:1", special_tokens=[("<|im_start|>", 1)]
    )
    assert teacher("hi").input_ids[0] == 1
    tok = train_bpe(training_texts()[:50], 400, like=teacher)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert tok("hi").input_ids[0] == start and start not in tok("hi", add_special_tokens=False).input_ids


# --- transplant_embeddings ------------------------------------------------------------------------


def test_greedy_match_takes_the_longest_piece_first() -> None:
    pieces = {b"a": 1, b"ab": 2, b"abc": 3, b"c": 4, b"\xf0": 5, b"\xf0\x9f": 6}
    assert greedy_byte_match(b"abcab\xf0\x9f\xf0", pieces) == [3, 2, 6, 5]
    assert greedy_byte_match(b"abd", pieces) is None  # no piece for b"d"
    assert greedy_byte_match(b"", pieces) == []


def naive_row(
    old: torch.Tensor, teacher: PreTrainedTokenizerBase, token: str, pieces: dict[bytes, int]
) -> torch.Tensor:
    """The row a new (non-special) token should get, computed the plain way: the teacher's pieces of its
    text, else of its bytes, else (a byte the teacher lacks) the mean of all rows."""
    raw = byte_level_bytes(token)
    assert raw is not None
    try:
        ids = teacher(raw.decode("utf-8"), add_special_tokens=False).input_ids
    except UnicodeDecodeError:
        ids = None
    ids = ids or greedy_byte_match(raw, pieces)
    return torch.stack([old[i] for i in ids]).mean(0) if ids else old.mean(0)


def test_rows_come_from_the_teacher_rows_of_the_same_text(
    teacher_tok: PreTrainedTokenizerBase, new_tok: PreTrainedTokenizerBase
) -> None:
    student = tiny_llama(layers=2)
    old = student.model.embed_tokens.weight.detach().clone()
    counts = transplant_embeddings(student, teacher_tok, new_tok)
    new = student.model.embed_tokens.weight.detach()
    assert new.shape == (1000, old.shape[1])
    assert counts["tokens"] == 1000 and counts["from_special"] == 17
    assert sum(v for k, v in counts.items() if k != "tokens") == 1000
    teacher_vocab, vocab = teacher_tok.get_vocab(), new_tok.get_vocab()
    pieces = teacher_byte_pieces(teacher_tok)

    # specials: the teacher's row of the same string
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert torch.equal(new[vocab[special]], old[teacher_vocab[special]])
    # a token the teacher has as one piece: exactly that row
    single = "Ġthe"
    assert single in vocab and teacher_tok(" the", add_special_tokens=False).input_ids == [
        teacher_vocab[single]
    ]
    assert torch.equal(new[vocab[single]], old[teacher_vocab[single]])
    # a token the teacher splits: the mean of its pieces
    multi = next(t for t in vocab if t not in teacher_vocab and t.isascii() and t.isalpha() and len(t) > 4)
    assert len(teacher_tok(byte_level_bytes(multi).decode(), add_special_tokens=False).input_ids) > 1  # type: ignore[union-attr]
    assert torch.allclose(new[vocab[multi]], naive_row(old, teacher_tok, multi, pieces), atol=1e-6)
    # half an emoji (not valid UTF-8): the teacher pieces of the same bytes
    fragment = byte_alphabet()[0xF0] + byte_alphabet()[0x9F]
    assert fragment in vocab and counts["byte_fallback"] > 0
    assert torch.allclose(new[vocab[fragment]], naive_row(old, teacher_tok, fragment, pieces), atol=1e-6)
    # a byte the teacher's vocabulary lacks (0xFF never occurs in UTF-8): the mean of all rows
    assert counts["unmatched"] == 21
    assert torch.allclose(new[vocab[byte_alphabet()[0xFF]]], old.mean(0), atol=1e-6)
    # every row agrees with the plain computation
    for token, idx in vocab.items():
        if idx >= 17:
            assert torch.allclose(new[idx], naive_row(old, teacher_tok, token, pieces), atol=1e-6), token


def test_tied_model_stays_tied_runs_and_generates(
    teacher_tok: PreTrainedTokenizerBase, new_tok: PreTrainedTokenizerBase
) -> None:
    student = tiny_llama(layers=2)
    student.generation_config.eos_token_id = [2, 0]  # several stop tokens: mapped through their strings
    transplant_embeddings(student, teacher_tok, new_tok)
    assert student.lm_head.weight is student.model.embed_tokens.weight
    assert student.config.vocab_size == len(new_tok) == student.lm_head.weight.shape[0]
    assert student.config.bos_token_id == new_tok.bos_token_id
    assert student.config.eos_token_id == new_tok.eos_token_id
    assert student.config.pad_token_id == student.generation_config.pad_token_id == new_tok.pad_token_id
    assert student.generation_config.eos_token_id == [
        new_tok.eos_token_id,
        new_tok.convert_tokens_to_ids("<|endoftext|>"),
    ]
    prompt = new_tok.apply_chat_template(
        [{"role": "user", "content": "Why is ice light?"}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([new_tok(prompt, add_special_tokens=False).input_ids])
    with torch.no_grad():
        assert student(ids).logits.shape == (1, ids.shape[1], len(new_tok))
    out = student.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=new_tok.pad_token_id)
    assert out.shape[1] > ids.shape[1] and int(out.max()) < len(new_tok)


def test_untied_head_rows_come_from_the_head(
    teacher_tok: PreTrainedTokenizerBase, new_tok: PreTrainedTokenizerBase
) -> None:
    cfg = tiny_llama(layers=1).config
    cfg.tie_word_embeddings = False
    torch.manual_seed(1)
    student = LlamaForCausalLM(cfg)
    old_in, old_head = (
        student.model.embed_tokens.weight.detach().clone(),
        student.lm_head.weight.detach().clone(),
    )
    assert not torch.equal(old_in, old_head)
    transplant_embeddings(student, teacher_tok, new_tok)
    assert student.lm_head.weight is not student.model.embed_tokens.weight
    vocab, teacher_vocab = new_tok.get_vocab(), teacher_tok.get_vocab()
    for token in ("Ġthe", "<|im_end|>"):
        assert torch.equal(student.lm_head.weight[vocab[token]], old_head[teacher_vocab[token]])
        assert torch.equal(student.model.embed_tokens.weight[vocab[token]], old_in[teacher_vocab[token]])
    with torch.no_grad():
        assert student(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, len(new_tok))
