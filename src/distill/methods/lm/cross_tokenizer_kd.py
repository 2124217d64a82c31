"""`cross_tokenizer_kd`: distil a teacher whose tokenizer differs from the student's.

Token-level divergences need one vocabulary. Across tokenizers, the comparable quantities are over text:
the likelihood each model gives a chunk of characters both tokenizations cut at the same places (ALM,
Minixhofer et al. 2025), and the shape of the next-token distribution where both models have read the
same text, compared sorted so token identities do not matter (ULD, Boizard et al. 2024). Batches come
from `data.cross_tokenizer` (each row in both tokenizations, chunk indices included); the teacher is any
source (live: dense logits; served or cached: top-k log-probabilities over its own tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.configs.lm import CrossTokenizerKDConfig
from distill.data.batching import IGNORE, Batch
from distill.data.cross_tokenizer import CrossBatch
from distill.errors import CompatibilityError
from distill.losses.cross_tokenizer import alm_loss, chunk_sums, token_logprobs, uld_loss
from distill.methods.base import METHODS, StepContext
from distill.methods.lm.base import LMContext, LMMethod
from distill.teachers.base import AnySignal, SparseTeacherSignal


@dataclass
class TeacherTerms:
    """What the losses need of the teacher: log-probs of its own answer tokens, and its distribution
    sorted descending at the first token of every chunk (with the mass a top-k signal leaves out)."""

    token_logp: torch.Tensor  # (N_t,)
    sorted_probs: torch.Tensor  # (C, K)
    tail: torch.Tensor | None  # (C,) for a top-k teacher, None for a dense one
    missing: int  # answer tokens outside a top-k teacher's k (their log-prob is estimated from the tail)


def teacher_terms(
    signal: AnySignal,
    targets: torch.Tensor,
    first: torch.Tensor,
    temperature: float,
    chunk_rows: int,
    top: int | None = None,
) -> TeacherTerms:
    """Read the teacher's signal at its answer positions: dense logits chunk by chunk (never all N x V at
    once), or top-k log-probabilities (a token outside the top-k gets the tail mass spread evenly over the
    tokens the top-k leave out). A dense teacher's distribution is kept as its `top` largest probabilities
    and the rest as a tail: with `top` >= the student's vocabulary, ULD's value is the same as over the
    full sorted vector, at a fraction of a full sort (0: skip it, when ULD is off)."""
    device = targets.device
    if isinstance(signal, SparseTeacherSignal):
        ids, logp = signal.ids.to(device), signal.logprobs.to(device).float()
        hit = ids == targets[:, None]
        tail = signal.tail_mass().to(device)
        rest = max(signal.vocab_size - ids.shape[1], 1)
        estimate = torch.log(tail.clamp_min(1e-12) / rest)
        token_logp = torch.where(hit.any(-1), (logp * hit).sum(-1), estimate)
        at_first = torch.cat([logp[first], tail[first].clamp_min(1e-12).log()[:, None]], -1)
        probs = torch.log_softmax(at_first / temperature, -1).exp()
        return TeacherTerms(token_logp, probs[:, :-1], probs[:, -1], int((~hit.any(-1)).sum()))
    out = torch.empty(targets.shape[0], device=device)
    keep = signal.vocab_size if top is None else min(top, signal.vocab_size)
    sorted_rows: list[torch.Tensor] = []
    for start in range(0, signal.num_rows, chunk_rows):
        end = min(start + chunk_rows, signal.num_rows)
        logits = signal.logits(start, end).float()
        out[start:end] = token_logprobs(logits, targets[start:end])
        wanted = first[(first >= start) & (first < end)] - start
        if wanted.numel() and keep > 0:
            probs = torch.softmax(logits[wanted] / temperature, -1)
            sorted_rows.append(torch.topk(probs, keep, -1).values)
    if not sorted_rows:
        return TeacherTerms(out, out.new_zeros(first.shape[0], 0), None, 0)
    probs = torch.cat(sorted_rows)
    leftover = (1.0 - probs.sum(-1)).clamp_min(0.0) if keep < signal.vocab_size else None
    return TeacherTerms(out, probs, leftover, 0)


@METHODS.register("cross_tokenizer_kd")
class CrossTokenizerKD(LMMethod):
    name = "cross_tokenizer_kd"
    uses_teacher = True

    def __init__(self, cfg: CrossTokenizerKDConfig, ctx: LMContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: CrossTokenizerKDConfig = cfg

    def loss(self, ctx: StepContext, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        if not isinstance(batch, CrossBatch) or batch.teacher is None:
            raise CompatibilityError(
                "method cross_tokenizer_kd: teacher and student share a tokenizer here; use logit_kd (or set student.tokenizer)"
            )
        cfg = self.cfg
        teacher = self.lm.teacher
        assert teacher is not None
        rows = self.student_rows(ctx, batch)
        logits = rows.hidden @ rows.weight.T
        student_logp = token_logprobs(logits, rows.targets)
        if student_logp.shape[0] != batch.student_chunk.shape[0]:
            raise CompatibilityError(
                f"{student_logp.shape[0]} student answer tokens but {batch.student_chunk.shape[0]} aligned"
            )
        tb = batch.teacher
        t_select = tb.targets != IGNORE
        t_targets = tb.targets[t_select]
        signal = teacher.signal(tb, t_select)
        if signal.num_rows != batch.teacher_chunk.shape[0]:
            raise CompatibilityError(
                f"teacher gave {signal.num_rows} positions for {batch.teacher_chunk.shape[0]}"
            )
        top = self.lm.vocab_size if cfg.uld_weight > 0 else 0
        terms = teacher_terms(
            signal, t_targets, batch.teacher_first, cfg.temperature, self.lm.chunk_size, top
        )

        total = logits.new_zeros(())
        parts: dict[str, float] = {}
        n = ctx.normalizer
        if cfg.alm_weight > 0:
            chunks = batch.num_chunks
            s_chunk = chunk_sums(student_logp, batch.student_chunk, chunks)
            t_chunk = chunk_sums(terms.token_logp, batch.teacher_chunk, chunks)
            alm = alm_loss(s_chunk, t_chunk.detach(), cfg.temperature, cfg.alm_divergence).sum()
            total = total + cfg.alm_weight * alm
            parts["alm"] = float(alm.detach()) / n
        if cfg.uld_weight > 0:
            first = logits[batch.student_first]
            uld = uld_loss(first, terms.sorted_probs, terms.tail, cfg.temperature).sum()
            total = total + cfg.uld_weight * uld
            parts["uld"] = float(uld.detach()) / n
        nll = -student_logp.sum()
        if cfg.ce_weight > 0:
            total = total + cfg.ce_weight * nll
        parts["ce"] = float(nll.detach()) / n
        if terms.missing:
            parts["teacher_tokens_outside_top_k"] = terms.missing / max(int(t_targets.numel()), 1)
        return total / n, parts
