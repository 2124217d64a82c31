"""Held-out numbers that do not depend on the tokenizer, so students with different tokenizers (and the
teacher) are compared on one scale.

Bits per byte: the model's negative log-likelihood of the teacher's answers (end token included) in
bits, divided by the answers' UTF-8 bytes. Chunk KL: over the character-aligned chunks of each answer,
the binary KL between the teacher's and the student's chunk likelihoods (ALM's divergence at T = 1), zero
only when every chunk is as likely under both models.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import PreTrainedModel

from distill.data.batching import IGNORE, Batch
from distill.data.cross_tokenizer import PairedExample, collate_pairs
from distill.losses.cross_tokenizer import alm_loss, chunk_sums, token_logprobs
from distill.models.body import batch_hidden
from distill.progress import NullProgress, Progress


def answer_logprobs(model: PreTrainedModel, batch: Batch, chunk_size: int) -> torch.Tensor:
    """Log-probabilities of the answer tokens (row-major), through the LM head chunk by chunk."""
    select = batch.targets != IGNORE
    hidden = batch_hidden(model, batch)[select]
    targets = batch.targets[select]
    head = model.get_output_embeddings()
    assert head is not None
    out = [
        token_logprobs(head(hidden[s : s + chunk_size]).float(), targets[s : s + chunk_size])
        for s in range(0, hidden.shape[0], chunk_size)
    ]
    return torch.cat(out) if out else hidden.new_zeros(0)


@torch.no_grad()
def evaluate_bits_per_byte(
    student: PreTrainedModel,
    teacher: PreTrainedModel | None,
    pairs: list[PairedExample],
    *,
    pad_id: int,
    teacher_pad_id: int,
    batch_size: int = 8,
    chunk_size: int = 1024,
    progress: Progress | None = None,
    teacher_memo: dict[tuple[int, ...], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Student (and teacher) bits per byte of every held-out answer, and the chunk KL when the teacher's
    weights are here. `teacher_memo` keeps the teacher's answer log-probs between calls: the teacher is
    scored once however many students are evaluated."""
    memo = teacher_memo if teacher_memo is not None else {}
    progress = progress or NullProgress()
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].input_ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    nats = {"student": 0.0, "teacher": 0.0}
    chunk_kl, chunks, tokens = 0.0, 0, 0
    progress.start("evaluating (bits per byte)", len(batches))
    for idx in batches:
        batch = collate_pairs(pairs, [[i] for i in idx], pad_id, teacher_pad_id).to(device)
        s_logp = answer_logprobs(student, batch, chunk_size)
        nats["student"] -= float(s_logp.sum())
        tokens += int(s_logp.shape[0])
        if teacher is not None:
            assert batch.teacher is not None
            key = tuple(idx)
            if key not in memo:
                memo[key] = answer_logprobs(teacher, batch.teacher, chunk_size).cpu()
            t_logp = memo[key].to(device)
            nats["teacher"] -= float(t_logp.sum())
            n = batch.num_chunks
            kl = alm_loss(
                chunk_sums(s_logp, batch.student_chunk, n), chunk_sums(t_logp, batch.teacher_chunk, n)
            )
            chunk_kl += float(kl.sum())
            chunks += n
        progress.advance(1)
    progress.finish()
    if was_training:
        student.train()
    size = max(sum(p.answer_bytes for p in pairs), 1)
    out: dict[str, Any] = {
        "sequences": len(pairs),
        "bytes": size,
        "tokens": tokens,
        "bits_per_byte": nats["student"] / math.log(2) / size,
        "student_nll": nats["student"] / max(tokens, 1),
    }
    if teacher is not None:
        out["teacher_bits_per_byte"] = nats["teacher"] / math.log(2) / size
        out["excess_bits_per_byte"] = out["bits_per_byte"] - out["teacher_bits_per_byte"]
        out["chunk_kl"] = chunk_kl / max(chunks, 1)
        out["chunks"] = chunks
    return out
