"""Training data when teacher and student tokenize differently: each example in both tokenizations,
with the chunks (character-aligned token spans, `alignment.py`) of its answer, and batches that carry
the teacher's tokens next to the student's.

Both sides format the prompt with their own chat template; only the answer is aligned, since the loss
is taken there. An answer cut by `max_length` on either side keeps the chunks both sides hold in full,
so student and teacher always learn from the same characters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.data.alignment import Chunk, align, token_spans
from distill.data.batching import Batch, BatchStream, collate
from distill.data.records import Example
from distill.data.tokenize import TokenizedExample, prompt_ids


@dataclass
class PairedExample(TokenizedExample):
    """The student's tokens (the base fields) and the teacher's, with the answer's chunks: `a_*` index the
    student's answer tokens, `b_*` the teacher's (0 = the first answer token)."""

    teacher: TokenizedExample = field(default_factory=lambda: TokenizedExample([], 0))
    chunks: list[Chunk] = field(default_factory=list)
    answer_bytes: int = 0  # UTF-8 bytes of the answer text both sides keep (bits-per-byte denominator)


def pair_example(
    student_tok: PreTrainedTokenizerBase,
    teacher_tok: PreTrainedTokenizerBase,
    ex: Example,
    max_length: int,
    system_prompt: str | None,
) -> PairedExample | None:
    """One example in both tokenizations, or None when either prompt leaves no room for an answer."""
    if ex.completion is None:
        return None
    text = ex.completion
    ps = prompt_ids(student_tok, ex.prompt, system_prompt)
    pt = prompt_ids(teacher_tok, ex.prompt, system_prompt)
    ids_s, spans_s = token_spans(student_tok, text)
    ids_t, spans_t = token_spans(teacher_tok, text)
    chunks = align(spans_s, spans_t, len(text))
    ends = [e for _, e in spans_s]
    eos_s, eos_t = student_tok.eos_token_id, teacher_tok.eos_token_id
    if ex.finished and eos_s is not None and eos_t is not None:  # the end of the answer: one more chunk
        chunks.append(Chunk(len(ids_s), len(ids_s) + 1, len(ids_t), len(ids_t) + 1))
        ids_s, ids_t = [*ids_s, int(eos_s)], [*ids_t, int(eos_t)]
        ends.append(ends[-1] if ends else 0)
    room_s, room_t = max_length - len(ps), max_length - len(pt)
    kept = [c for c in chunks if c.a_end <= room_s and c.b_end <= room_t]
    if len(ps) >= max_length - 1 or len(pt) >= max_length - 1 or not kept:
        return None
    last = kept[-1]
    chars = max(ends[: last.a_end])
    return PairedExample(
        input_ids=ps + ids_s[: last.a_end],
        prompt_len=len(ps),
        teacher=TokenizedExample(pt + ids_t[: last.b_end], len(pt)),
        chunks=kept,
        answer_bytes=len(text[:chars].encode("utf-8")),
    )


def pair_examples(
    student_tok: PreTrainedTokenizerBase,
    teacher_tok: PreTrainedTokenizerBase,
    examples: list[Example],
    max_length: int,
    system_prompt: str | None,
) -> tuple[list[PairedExample], int]:
    """Pair every example; returns the pairs and how many were dropped."""
    out = [pair_example(student_tok, teacher_tok, ex, max_length, system_prompt) for ex in examples]
    kept = [p for p in out if p is not None]
    return kept, len(out) - len(kept)


@dataclass
class CrossBatch(Batch):
    """A student batch plus the same rows in the teacher's tokens. Selected (answer) positions of either
    batch, row-major, are numbered by chunk: `student_chunk[i]` is the chunk of the student's i-th answer
    token, and `student_first[c]` the student row that starts chunk c (likewise for the teacher)."""

    teacher: Batch | None = None
    student_chunk: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    teacher_chunk: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    student_first: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    teacher_first: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def num_chunks(self) -> int:
        return int(self.student_first.shape[0])

    def to(self, device: torch.device) -> CrossBatch:
        assert self.teacher is not None
        moved = super().to(device)
        return CrossBatch(
            moved.input_ids,
            moved.attention_mask,
            moved.position_ids,
            moved.targets,
            moved.num_real_tokens,
            teacher=self.teacher.to(device),
            student_chunk=self.student_chunk.to(device),
            teacher_chunk=self.teacher_chunk.to(device),
            student_first=self.student_first.to(device),
            teacher_first=self.teacher_first.to(device),
        )


def collate_pairs(
    examples: list[PairedExample], rows: list[list[int]], pad_id: int, teacher_pad_id: int
) -> CrossBatch:
    """Both tokenizations of the same rows (one example per row: pairs are never packed)."""
    student = collate(list(examples), rows, pad_id, packing=False)
    teacher = collate([e.teacher for e in examples], rows, teacher_pad_id, packing=False)
    s_chunk: list[int] = []
    t_chunk: list[int] = []
    s_first: list[int] = []
    t_first: list[int] = []
    for row in rows:
        (i,) = row
        for chunk in examples[i].chunks:
            c = len(s_first)
            s_first.append(len(s_chunk))
            t_first.append(len(t_chunk))
            s_chunk.extend([c] * (chunk.a_end - chunk.a_start))
            t_chunk.extend([c] * (chunk.b_end - chunk.b_start))

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    return CrossBatch(
        student.input_ids,
        student.attention_mask,
        student.position_ids,
        student.targets,
        student.num_real_tokens,
        teacher=teacher,
        student_chunk=tensor(s_chunk),
        teacher_chunk=tensor(t_chunk),
        student_first=tensor(s_first),
        teacher_first=tensor(t_first),
    )


class CrossBatchStream(BatchStream):
    """`BatchStream` over paired examples: the same order and resume state, batches of `CrossBatch`."""

    def __init__(
        self,
        examples: list[PairedExample],
        batch_size: int,
        pad_id: int,
        teacher_pad_id: int,
        *,
        seed: int,
        group_by_length: bool,
        max_length: int,
    ) -> None:
        super().__init__(
            list(examples),
            batch_size,
            pad_id,
            seed=seed,
            group_by_length=group_by_length,
            packing=False,
            max_length=max_length,
        )
        self.pairs = examples
        self.teacher_pad_id = teacher_pad_id

    def collate_rows(self, rows: list[list[int]]) -> Batch:
        return collate_pairs(self.pairs, rows, self.pad_id, self.teacher_pad_id)
