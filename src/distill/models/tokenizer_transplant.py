"""Give the student a tokenizer of its own: train a small byte-level BPE on the training text, then swap
the student's vocabulary for it, initialising each new embedding row from the teacher rows of the text it
stands for ("transplantation"), so the student starts close to the teacher instead of from noise."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.errors import RecipeError

_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: each of the 256 bytes as one printable character (printable Latin-1
    bytes stand for themselves, the others are shifted past U+0100), so any byte string is a str of the
    same length that BPE can merge and that never contains whitespace or control characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


@lru_cache(maxsize=1)
def _char_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_alphabet().items()}


def byte_level_bytes(token: str) -> bytes | None:
    """The bytes a byte-level token stands for, or None if it is not made of byte-alphabet characters."""
    table = _char_to_byte()
    if any(c not in table for c in token):
        return None
    return bytes(table[c] for c in token)


def special_tokens_of(tok: PreTrainedTokenizerBase) -> list[str]:
    """Every special token of `tok` in id order: the named ones and each added token flagged special
    (chat markers such as <|im_start|>; GGUF-loaded tokenizers list some only in `added_tokens_decoder`)."""
    vocab = tok.get_vocab()
    found = {str(added): int(idx) for idx, added in tok.added_tokens_decoder.items() if added.special}
    for name in tok.all_special_tokens:
        found.setdefault(str(name), vocab.get(str(name), len(vocab)))
    return sorted(found, key=found.__getitem__)


def train_bpe(
    texts: Iterable[str], vocab_size: int, like: PreTrainedTokenizerBase, seed: int = 0
) -> PreTrainedTokenizerFast:
    """A byte-level BPE with `vocab_size` entries (specials included) trained on `texts`.

    Byte level with the full 256-byte initial alphabet, so every text encodes without an unknown token and
    decodes back exactly. The special tokens (ids 0.., in the teacher's order), the named roles (bos, eos,
    unk, pad) and the chat template come from `like`, so chat prompts render identically for both models.
    `seed` is accepted for a uniform recipe API but changes nothing: `tokenizers` trains BPE without
    randomness (the alphabet is sorted and ties between equally frequent pairs are broken by pair ids),
    which the tests check. A corpus with too few distinct pairs yields fewer entries than `vocab_size`.
    """
    del seed
    specials = special_tokens_of(like)
    floor = 256 + len(specials)
    if vocab_size < floor:
        raise RecipeError(
            f"student.tokenizer.vocab_size must be at least {floor} (256 byte symbols + {len(specials)} "
            f"special tokens of the teacher), got {vocab_size}"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # a pair seen once is memorised text, not a reusable piece
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend = _with_teacher_post_processor(backend, like)
    roles: dict[str, Any] = {
        name: str(getattr(like, name)) for name in _NAMED_SPECIALS if getattr(like, name) is not None
    }
    named = set(roles.values())
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        additional_special_tokens=[t for t in specials if t not in named],
        chat_template=like.chat_template,
        padding_side=like.padding_side,
        clean_up_tokenization_spaces=False,  # "a ." must decode to "a .", not "a."
        **roles,
    )


def _with_teacher_post_processor(backend: Tokenizer, like: PreTrainedTokenizerBase) -> Tokenizer:
    """Copy the teacher's template post-processor (e.g. Llama 3's bos before every text), its special-token
    ids rewritten to the new ones, so `tok(text)` adds the same specials for the student as for the
    teacher. Other post-processors (or none) are left out: byte-level offsets need no trimming here."""
    teacher_backend = getattr(like, "backend_tokenizer", None)
    if teacher_backend is None:
        return backend
    post = json.loads(teacher_backend.to_str()).get("post_processor")
    if not post or post.get("type") != "TemplateProcessing":
        return backend
    for entry in post.get("special_tokens", {}).values():
        entry["ids"] = [backend.token_to_id(t) for t in entry["tokens"]]
        if any(i is None for i in entry["ids"]):
            return backend  # a template special the new vocabulary lacks: add none rather than a wrong one
    spec = json.loads(backend.to_str())
    spec["post_processor"] = post
    return Tokenizer.from_str(json.dumps(spec))


def _is_byte_level(tok: PreTrainedTokenizerBase) -> bool:
    """Whether `tok`'s vocabulary is written in the byte-level alphabet (its decoder is ByteLevel)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


def teacher_byte_pieces(teacher_tok: PreTrainedTokenizerBase) -> dict[bytes, int]:
    """The teacher's vocabulary as byte strings -> id, for matching text that is not valid UTF-8.

    Byte-level vocabularies map every token through the byte alphabet; SentencePiece byte-fallback tokens
    (`<0xE4>`) map to their single byte. Specials are left out: they are markers, not text.
    """
    specials = set(special_tokens_of(teacher_tok))
    byte_level = _is_byte_level(teacher_tok)
    pieces: dict[bytes, int] = {}
    for token, idx in teacher_tok.get_vocab().items():
        if token in specials:
            continue
        raw = byte_level_bytes(token) if byte_level else None
        if raw is None and (hexed := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)):
            raw = bytes([int(hexed.group(1), 16)])
        if raw and raw not in pieces:
            pieces[raw] = idx
    return pieces


def greedy_byte_match(raw: bytes, pieces: dict[bytes, int], longest: int = 0) -> list[int] | None:
    """Cover `raw` left to right with the longest teacher piece at each position; None if some byte has no
    piece at all (SmolLM2's vocabulary lacks 21 single bytes: ones UTF-8 never uses, such as 0xC0 and
    0xF5..0xFF, and a few rare control bytes). `longest` (the longest piece, in bytes) is computed when not given."""
    longest = longest or max((len(p) for p in pieces), default=0)
    ids: list[int] = []
    pos = 0
    while pos < len(raw):
        for end in range(min(len(raw), pos + longest), pos, -1):
            idx = pieces.get(raw[pos:end])
            if idx is not None:
                ids.append(idx)
                pos = end
                break
        else:
            return None
    return ids


def transplant_embeddings(
    student: PreTrainedModel, teacher_tok: PreTrainedTokenizerBase, new_tok: PreTrainedTokenizerBase
) -> dict[str, int]:
    """Swap the student's vocabulary for `new_tok`'s, in place, keeping what the teacher rows know.

    Row of each new token, taken from the student's current (teacher-vocabulary) rows:
    - a special token the teacher also has (same string): the teacher's row for it;
    - text that is valid UTF-8: the mean of the rows of `teacher_tok(text, add_special_tokens=False)`, the
      teacher's own segmentation;
    - a byte-level fragment that is not valid UTF-8 (half an emoji): its bytes covered greedily by the
      longest teacher pieces of the same bytes (down to single-byte pieces), mean of their rows;
    - nothing matched (a teacher with no byte pieces): the mean of all rows, counted as `unmatched`.
    An untied LM head gets the same treatment on its own rows (and bias). Config and generation config
    get the new vocab size and bos/eos/pad ids. Returns how many rows came from each rule.
    """
    old_in = _param(student.get_input_embeddings(), "weight").detach().clone()
    head = student.get_output_embeddings()
    head_weight = None if head is None else _param(head, "weight")
    head_bias = None if head is None else getattr(head, "bias", None)
    tied = bool(getattr(student.config, "tie_word_embeddings", False)) or (
        head_weight is _param(student.get_input_embeddings(), "weight")
    )
    old_out = None if tied or head_weight is None else head_weight.detach().clone()
    old_bias = None if tied or not isinstance(head_bias, torch.Tensor) else head_bias.detach().clone()

    teacher_vocab = teacher_tok.get_vocab()
    teacher_specials = {t: teacher_vocab[t] for t in special_tokens_of(teacher_tok) if t in teacher_vocab}
    new_specials = set(special_tokens_of(new_tok))
    counts = {"tokens": len(new_tok), "from_special": 0, "from_pieces": 0, "byte_fallback": 0, "unmatched": 0}
    new_is_byte_level = _is_byte_level(new_tok)
    rows = old_in.shape[0]
    bags: list[list[int]] = [[] for _ in range(len(new_tok))]
    texts: dict[int, str] = {}  # new id -> text for the teacher to segment (batched below: much faster)
    raws: dict[int, bytes] = {}  # new id -> the bytes of a byte-level token
    for new_id in range(len(new_tok)):
        token = str(new_tok.convert_ids_to_tokens(new_id))
        if token in teacher_specials:
            bags[new_id] = [teacher_specials[token]]
            counts["from_special"] += 1
            continue
        raw = byte_level_bytes(token) if new_is_byte_level and token not in new_specials else None
        text = token if raw is None else _utf8(raw)
        if raw is not None:
            raws[new_id] = raw
        if text is not None:
            texts[new_id] = text
    if texts:
        encoded = teacher_tok(list(texts.values()), add_special_tokens=False)["input_ids"]
        for new_id, ids in zip(texts, encoded, strict=True):
            bags[new_id] = [int(i) for i in ids if 0 <= i < rows]
            counts["from_pieces"] += bool(bags[new_id])
    fragments = {new_id: raw for new_id, raw in raws.items() if not bags[new_id]}
    if fragments:
        pieces = {b: i for b, i in teacher_byte_pieces(teacher_tok).items() if i < rows}
        longest = max((len(p) for p in pieces), default=0)
        for new_id, raw in fragments.items():
            bags[new_id] = greedy_byte_match(raw, pieces, longest) or []
            counts["byte_fallback"] += bool(bags[new_id])
    counts["unmatched"] = sum(not bag for bag in bags)

    new_in = _bag_means(old_in, bags)
    new_out = None if old_out is None else _bag_means(old_out, bags)
    new_bias = None if old_bias is None else _bag_means(old_bias[:, None], bags)[:, 0]

    student.resize_token_embeddings(len(new_tok), mean_resizing=False)
    with torch.no_grad():
        _param(student.get_input_embeddings(), "weight").copy_(new_in)
        out_layer = student.get_output_embeddings()
        if new_out is not None and out_layer is not None:
            _param(out_layer, "weight").copy_(new_out)
            if new_bias is not None:
                _param(out_layer, "bias").copy_(new_bias)
    if tied:
        student.tie_weights()
    _update_token_ids(student, teacher_tok, new_tok)
    return counts


def _param(module: torch.nn.Module, name: str) -> torch.Tensor:
    value = getattr(module, name, None)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no tensor {name!r}")
    return value


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _bag_means(rows: torch.Tensor, bags: list[list[int]]) -> torch.Tensor:
    """Mean of `rows[bag]` for each bag, in float32 (bf16 sums lose digits); an empty bag gets the mean
    of all rows (a neutral point, rather than zeros that the norm layers would blow up)."""
    weight = rows.float()
    flat = torch.tensor([i for bag in bags for i in bag], dtype=torch.long)
    offsets = torch.tensor([0, *[len(b) for b in bags]], dtype=torch.long).cumsum(0)[:-1]
    means = F.embedding_bag(flat, weight, offsets, mode="mean")
    empty = torch.tensor([not b for b in bags])
    if empty.any():
        means[empty] = weight.mean(0)
    return means.to(rows.dtype)


def _update_token_ids(
    student: PreTrainedModel, teacher_tok: PreTrainedTokenizerBase, new_tok: PreTrainedTokenizerBase
) -> None:
    """bos/eos/pad ids of the config and generation config, in the new vocabulary. A list of eos ids
    (several stop tokens) is mapped id by id through the token strings; stops the new vocabulary lacks go."""
    student.config.vocab_size = len(new_tok)
    new_vocab = new_tok.get_vocab()
    targets: list[Any] = [student.config]
    if getattr(student, "generation_config", None) is not None:
        targets.append(student.generation_config)
    for cfg in targets:
        for role in ("bos", "eos", "pad"):
            new_id = getattr(new_tok, f"{role}_token_id")
            old = getattr(cfg, f"{role}_token_id", None)
            if role == "eos" and isinstance(old, list):
                mapped = [new_id] if new_id is not None else []
                for old_id in old:
                    idx = new_vocab.get(str(teacher_tok.convert_ids_to_tokens(int(old_id))))
                    if idx is not None and idx not in mapped:
                        mapped.append(idx)
                cfg.eos_token_id = mapped or None
            else:
                setattr(cfg, f"{role}_token_id", new_id)
