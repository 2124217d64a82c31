"""Training views of the data factory's teacher answers, beyond plain prompt -> answer:

* `step_by_step_pairs`: Distilling Step-by-Step (Hsieh et al. 2023) - one answer becomes two tasks told
  apart by a prefix on the user message, predict the final answer / write the rationale.
* `chunked_examples`: Skip-Thinking-style chunk-wise training - a trace cut into chunks, each learnt as
  its own example given the prompt and the chunks before it, so the gradient of a long trace is not
  dominated by its length and every chunk is learnt from the exact context it will be written in.
"""

from __future__ import annotations

import re
from dataclasses import replace

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.data.alignment import token_spans
from distill.data.records import Example
from distill.data.tokenize import TokenizedExample, prompt_ids
from distill.errors import InputError

_SENTENCE_END = re.compile(r"(?<=[.!?])[ \t]+(?=\S)")


def with_prefix(messages: list[dict[str, str]], prefix: str) -> list[dict[str, str]]:
    """The conversation with `prefix` prepended to its last user message (the one being answered)."""
    if not prefix:
        return list(messages)
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            out = list(messages)
            out[i] = {**messages[i], "content": prefix + messages[i]["content"]}
            return out
    raise InputError("prompt: a task prefix goes on the user message, and this conversation has none")


def step_by_step_pairs(
    examples: list[Example], label_prefix: str, rationale_prefix: str
) -> list[tuple[Example, Example]]:
    """(label task, rationale task) per example whose answer splits into a non-empty rationale and a
    final answer (`reasoning.verifiers.split_rationale`); the others cannot teach both tasks and are
    left out. The label task's completion is `Answer: <answer>`, the answer-format every task states."""
    from distill.reasoning.verifiers import split_rationale

    out: list[tuple[Example, Example]] = []
    for ex in examples:
        if ex.completion is None:
            continue
        rationale, answer = split_rationale(ex.completion)
        if not answer or not rationale:
            continue
        label = replace(ex, prompt=with_prefix(ex.prompt, label_prefix), completion=f"Answer: {answer}")
        reason = replace(ex, prompt=with_prefix(ex.prompt, rationale_prefix), completion=rationale)
        out.append((replace(label, finished=True), replace(reason, finished=True)))
    return out


def split_chunks(text: str, chunk_by: str, max_chunks: int) -> list[str]:
    """`text` cut after each line end (and, by sentence, before the spaces after `.`, `!` or `?`, where
    word tokens start), whitespace-only pieces joined to the one before, then consecutive pieces grouped
    into at most `max_chunks` chunks of near-equal piece counts. The chunks concatenate back to `text`."""
    if chunk_by not in ("line", "sentence"):
        raise ValueError(f"chunk_by: must be 'line' or 'sentence', got {chunk_by!r}")
    if max_chunks < 1:
        raise ValueError(f"max_chunks: must be >= 1, got {max_chunks!r}")
    cuts = {m.end() for m in re.finditer(r"\n", text)}
    if chunk_by == "sentence":
        cuts |= {m.start() for m in _SENTENCE_END.finditer(text)}  # the space starts the next sentence
    pieces: list[str] = []
    start = 0
    for cut in sorted(c for c in cuts if 0 < c < len(text)) + [len(text)]:
        piece = text[start:cut]
        if pieces and (not piece.strip() or not pieces[-1].strip()):
            pieces[-1] += piece
        else:
            pieces.append(piece)
        start = cut
    n = len(pieces)
    if n <= max_chunks:
        return pieces
    return ["".join(pieces[k * n // max_chunks : (k + 1) * n // max_chunks]) for k in range(max_chunks)]


def _token_bounds(spans: list[tuple[int, int]], chunks: list[str]) -> list[int]:
    """Tokens before each chunk boundary (a token belongs to the chunk its first character is in),
    empty chunks (a token spanning a whole chunk) dropped."""
    bounds = [0]
    end = 0
    for chunk in chunks:
        end += len(chunk)
        count = sum(1 for s, _ in spans if s < end)
        if count > bounds[-1]:
            bounds.append(count)
    if bounds[-1] < len(spans):  # tokens past the last character (none for offset-faithful tokenizers)
        bounds[-1] = len(spans)
    return bounds


def chunked_examples(
    tok: PreTrainedTokenizerBase,
    examples: list[Example],
    max_length: int,
    system_prompt: str | None,
    chunk_by: str = "line",
    max_chunks: int = 8,
) -> list[TokenizedExample]:
    """One tokenised example per chunk of each answer: input_ids = prompt + chunks[:k+1], prompt_len =
    len(prompt + chunks[:k]), so only chunk k carries loss; the last chunk ends with the end token (when
    the answer finished). The answer is tokenised once, whole, and cut at the chunks' character bounds
    (a fast tokenizer's offsets), so the contexts are exactly the ids the student writes. Chunks that
    start at or beyond `max_length` are dropped, a chunk crossing it is cut."""
    out: list[TokenizedExample] = []
    eos = tok.eos_token_id
    for ex in examples:
        if ex.completion is None or not ex.completion:
            continue
        p = prompt_ids(tok, ex.prompt, system_prompt)
        ids, spans = token_spans(tok, ex.completion)
        if ex.finished and eos is not None:
            ids = [*ids, int(eos)]
        bounds = _token_bounds(spans, split_chunks(ex.completion, chunk_by, max_chunks))
        if len(bounds) == 1:
            bounds.append(len(ids))
        bounds[-1] = len(ids)  # the end token goes with the last chunk
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            if len(p) + lo >= max_length:
                break
            out.append(TokenizedExample(input_ids=(p + ids[:hi])[:max_length], prompt_len=len(p) + lo))
    return out
