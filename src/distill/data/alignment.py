"""Align two tokenizations of one text by character spans.

Teacher and student with different tokenizers see the same answer text cut differently. Where both
tokenizations have a cut at the same place in the text, the tokens between two such shared cuts cover
exactly the same characters on both sides: a *chunk*. A chunk's likelihood is then comparable across
the two models (ALM), and the position before a chunk conditions both models on the same text (ULD).

Cuts come from the tokenizer's character offsets, which refer to the original text whatever the
normaliser did. A byte-level token that holds part of a multi-byte character overlaps its neighbour's
offsets: no cut there. Characters no token covers (dropped by a normaliser or trimmed whitespace) make a
cut an interval rather than a point; two cuts match when their intervals meet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.errors import CompatibilityError

Span = tuple[int, int]


@dataclass(frozen=True)
class Chunk:
    """Tokens [a_start, a_end) of side A and [b_start, b_end) of side B cover the same characters."""

    a_start: int
    a_end: int
    b_start: int
    b_end: int


def token_spans(tok: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[Span]]:
    """Ids of `text` (no special tokens) and each token's character span in `text`."""
    if not getattr(tok, "is_fast", False):
        raise CompatibilityError(
            f"tokenizer {type(tok).__name__}: cross-tokenizer alignment needs a fast tokenizer (character offsets)"
        )
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]


def cuts(spans: Sequence[Span], length: int) -> list[tuple[int, int, int]]:
    """The places where a token sequence can be cut: (tokens before the cut, lo, hi) with the cut lying
    anywhere in characters [lo, hi]. The start (0 tokens) and the end (all tokens) are always cuts."""
    n = len(spans)
    out = [(0, 0, spans[0][0] if n else length)]
    if n == 0:
        return out
    # suffix minimum of starts: a cut after token i needs every later token to start at or after it
    later_start = [length] * (n + 1)
    for i in range(n - 1, -1, -1):
        later_start[i] = min(spans[i][0], later_start[i + 1])
    reach = 0
    for i in range(n - 1):
        reach = max(reach, spans[i][1])
        if reach <= later_start[i + 1]:
            out.append((i + 1, reach, later_start[i + 1]))
    reach = max(reach, spans[-1][1])
    out.append((n, reach, max(reach, length)))
    return out


def align(a: Sequence[Span], b: Sequence[Span], length: int) -> list[Chunk]:
    """Chunks covering both token sequences in order: consecutive cuts the two sides share. Every chunk
    holds at least one token on each side (a side with no tokens in a stretch joins it to the next)."""
    ca, cb = cuts(a, length), cuts(b, length)
    shared: list[tuple[int, int]] = [(0, 0)]
    i = j = 1
    while i < len(ca) and j < len(cb):
        ta, lo_a, hi_a = ca[i]
        tb, lo_b, hi_b = cb[j]
        if hi_a < lo_b:
            i += 1
        elif hi_b < lo_a:
            j += 1
        else:
            if ta > shared[-1][0] and tb > shared[-1][1]:
                shared.append((ta, tb))
            i += 1
            j += 1
    end = (len(a), len(b))
    if shared[-1] != end:
        if shared[-1][0] == end[0] or shared[-1][1] == end[1]:
            shared.pop()  # a last stretch empty on one side joins the chunk before it
        shared.append(end)
    if end == (0, 0):
        return []
    return [
        Chunk(pa, na, pb, nb) for (pa, pb), (na, nb) in zip(shared[:-1], shared[1:], strict=True) if na > pa
    ]
