"""Held-out evaluation of a student against its teacher, token by token on the answer tokens.

KL(teacher||student) is the headline number (what logit KD minimises); reverse KL, top-1 agreement,
student NLL/perplexity on the teacher's answers and KL by answer position complete the picture.

A run scores several students (before training, each method, baselines) against one frozen teacher, so
the teacher's side is computed once (`teacher_memo`). What is kept is the teacher's final hidden state at
each answer token (on CPU, in the teacher's dtype), not its log-probs: re-applying the LM head to it gives
the same logits bit for bit at hidden/vocab of the memory. Quickstart held-out set (126 answers of <= 64
tokens, SmolLM2-135M: hidden 576, vocabulary 49,152, fp32): at most 18.6 MB of hidden states, against
1.59 GB for dense fp32 log-probs. The head is a small share of the teacher's forward (it runs on answer
tokens only, the body on every token), so nearly all of the teacher's cost is saved.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import PreTrainedModel

from distill.data.batching import IGNORE, Batch, collate
from distill.data.tokenize import TokenizedExample
from distill.losses.tokens import DivergenceSpec, divergence_per_token
from distill.models.body import batch_hidden
from distill.progress import NullProgress, Progress
from distill.teachers.base import TeacherSignal
from distill.teachers.live import LiveTeacherSource

FORWARD_KL = DivergenceSpec(name="forward_kl")
REVERSE_KL = DivergenceSpec(name="reverse_kl")


@torch.no_grad()
def evaluate(
    student: PreTrainedModel,
    teacher: LiveTeacherSource | None,
    examples: list[TokenizedExample],
    *,
    vocab_size: int,
    pad_id: int,
    batch_size: int = 8,
    buckets: list[int] | None = None,
    chunk_size: int = 1024,
    progress: Progress | None = None,
    teacher_memo: dict[tuple[int, ...], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Per-token means over every answer token of `examples` (no sampling, no selection).

    The teacher is a live model: held-out metrics are computed against its exact, full distribution.
    `teacher_memo` keeps the teacher's side between calls (keyed by each batch's tokens), so it runs once
    however many students are scored; the numbers are identical with or without it."""
    progress = progress or NullProgress()
    buckets = buckets or [0, 8, 16, 32, 64, 128, 256]
    was_training = student.training
    student.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    sums = {"kl": 0.0, "reverse_kl": 0.0, "top1": 0.0, "nll": 0.0, "teacher_nll": 0.0}
    n_tokens = 0
    bucket_kl = [0.0] * len(buckets)
    bucket_n = [0] * len(buckets)
    head = student.get_output_embeddings()
    assert head is not None
    device = next(student.parameters()).device
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    progress.start("evaluating", len(batches))
    for idx in batches:
        batch = collate(examples, [[i] for i in idx], pad_id, packing=False).to(device)
        select = batch.targets != IGNORE
        prompt_len = torch.tensor([examples[i].prompt_len for i in idx], device=device)
        answer_pos = (batch.position_ids + 1 - prompt_len[:, None])[select]
        targets = batch.targets[select]
        hidden = batch_hidden(student, batch)[select]
        signal = teacher_signal(teacher, batch, select, teacher_memo) if teacher is not None else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            s_logits = head(hidden[start:end])[:, :vocab_size].float()
            s_logp = torch.log_softmax(s_logits, dim=-1)
            tgt = targets[start:end]
            sums["nll"] += float(-s_logp.gather(1, tgt[:, None]).sum())
            if signal is not None:
                t_logits = signal.logits(start, end)
                t_logp = torch.log_softmax(t_logits, dim=-1)
                # through losses/, with the training loss's log-prob floor: a teacher with -inf logits
                # gives the same finite numbers here as in training
                kl = divergence_per_token(s_logits, t_logits, FORWARD_KL)
                sums["kl"] += float(kl.sum())
                sums["reverse_kl"] += float(divergence_per_token(s_logits, t_logits, REVERSE_KL).sum())
                sums["top1"] += float((t_logp.argmax(-1) == s_logp.argmax(-1)).sum())
                sums["teacher_nll"] += float(-t_logp.gather(1, tgt[:, None]).sum())
                pos = answer_pos[start:end]
                for b, lo in enumerate(buckets):
                    hi = buckets[b + 1] if b + 1 < len(buckets) else math.inf
                    m = (pos >= lo) & (pos < hi)
                    bucket_kl[b] += float(kl[m].sum())
                    bucket_n[b] += int(m.sum())
        n_tokens += hidden.shape[0]
        progress.advance(1)
    progress.finish()
    if was_training:
        student.train()
    n = max(n_tokens, 1)
    out: dict[str, Any] = {
        "tokens": n_tokens,
        "sequences": len(examples),
        "student_nll": sums["nll"] / n,
        "student_ppl": math.exp(min(sums["nll"] / n, 50.0)),
    }
    if teacher is not None:
        out.update(
            {
                "kl": sums["kl"] / n,
                "reverse_kl": sums["reverse_kl"] / n,
                "top1_agreement": sums["top1"] / n,
                "teacher_nll": sums["teacher_nll"] / n,
                "kl_by_position": [
                    {
                        "start": lo,
                        "end": buckets[b + 1] if b + 1 < len(buckets) else None,
                        "tokens": bucket_n[b],
                        "kl": bucket_kl[b] / bucket_n[b] if bucket_n[b] else None,
                    }
                    for b, lo in enumerate(buckets)
                ],
            }
        )
    return out


def teacher_signal(
    teacher: LiveTeacherSource,
    batch: Batch,
    select: torch.Tensor,
    memo: dict[tuple[int, ...], torch.Tensor] | None,
) -> TeacherSignal:
    """The teacher's logits at the `select` positions, its answer hidden states taken from (or stored
    in) `memo` when one is given; either way the logits come out of the same head call on the same
    hidden states, hence bit-identical."""
    if memo is None:
        return teacher.signal(batch, select)
    key = batch_key(batch, select)
    if key not in memo:
        full = (
            teacher.prefix.hidden(batch) if teacher.prefix is not None else batch_hidden(teacher.model, batch)
        )
        memo[key] = full[select].cpu()
    return teacher._lazy_logits(memo[key].to(select.device))  # the head `signal` applies, on the kept states


def batch_key(batch: Batch, select: torch.Tensor) -> tuple[int, ...]:
    """A batch's identity for the memo: its shape, token ids, row lengths and the positions scored."""
    assert batch.attention_mask is not None
    return (
        *batch.input_ids.shape,
        *batch.input_ids.flatten().tolist(),
        *batch.attention_mask.sum(-1).tolist(),
        *select.flatten().nonzero().flatten().tolist(),
    )
