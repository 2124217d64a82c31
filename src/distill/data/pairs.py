"""Batches of example pairs: two answers to one prompt (chosen / rejected), or two tasks made from one
teacher answer (label / rationale). A batch of B pairs is one `Batch` of 2B rows, the first elements in
rows [0, B) and the second ones in rows [B, 2B) in the same order, so a method finds the halves from the
row count alone and one forward pass of the student covers both."""

from __future__ import annotations

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.data.batching import Batch, BatchStream, collate
from distill.data.records import Example
from distill.data.tokenize import TokenizedExample, tokenize_examples
from distill.errors import CompatibilityError

Pair = tuple[TokenizedExample, TokenizedExample]


class PairStream(BatchStream):
    """`BatchStream` over pairs: the same epoch order (a pure function of the seed), sharding and exact
    resume state (epoch, index); each pair is planned by the longer of its two examples, never packed."""

    def __init__(
        self,
        pairs: list[Pair],
        batch_size: int,
        pad_id: int,
        *,
        seed: int,
        group_by_length: bool = True,
    ) -> None:
        if not pairs:
            raise CompatibilityError("data.train: no training pairs")
        longer = [a if len(a.input_ids) >= len(b.input_ids) else b for a, b in pairs]
        super().__init__(
            longer,
            batch_size,
            pad_id,
            seed=seed,
            group_by_length=group_by_length,
            packing=False,
            max_length=max(len(e.input_ids) for e in longer),
        )
        self.pairs = pairs

    def collate_rows(self, rows: list[list[int]]) -> Batch:
        picked = [self.pairs[i] for row in rows for i in row]
        items = [a for a, _ in picked] + [b for _, b in picked]
        return collate(items, [[k] for k in range(len(items))], self.pad_id, packing=False)


def tokenize_pairs(
    tok: PreTrainedTokenizerBase,
    pairs: list[tuple[Example, Example]],
    max_length: int,
    system_prompt: str | None,
) -> tuple[list[Pair], int]:
    """Tokenise both sides of every pair; a pair is dropped when either side is (no answer, or a prompt
    too long for `max_length`). Returns the pairs and how many were dropped."""
    out: list[Pair] = []
    for a, b in pairs:
        both, _ = tokenize_examples(tok, [a, b], max_length, system_prompt)
        if len(both) == 2:
            out.append((both[0], both[1]))
    return out, len(pairs) - len(out)
