"""`minillm`: reverse KL(student‖teacher) over whole sequences by policy gradient (Gu et al. 2024).

The sequence-level reverse KL's gradient splits, per generated token t, into
- a single-step part: the exact reverse KL of the next-token distributions at t (computed over the whole
  vocabulary through the fused head, so it has no sampling variance), and
- a long-term part: REINFORCE on log q(y_t) with the reward of the tokens after t, r = log p - log q of
  each, summed and (with `length_normalize`) divided by how many there are, so long answers are not
  favoured.
With `teacher_mix` > 0 the samples come from the mixture (1 - a) q + a p (less reward hacking early on),
and each token's REINFORCE term is importance-weighted by q / mixture, clipped at `weight_clip`. The
single-step term is left unweighted (a simplification; the weights are near 1 for small mixes).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from distill.configs.on_policy import MiniLLMConfig
from distill.data.batching import Batch
from distill.methods.base import METHODS, StepContext
from distill.methods.lm.base import LMContext, StudentRows
from distill.methods.lm.on_policy import OnPolicyKD
from distill.teachers.base import AnySignal, TeacherSignal


@METHODS.register("minillm")
class MiniLLM(OnPolicyKD):
    name = "minillm"

    def __init__(self, cfg: MiniLLMConfig, ctx: LMContext) -> None:
        super().__init__(cfg, ctx)
        self.mcfg = cfg

    def prepare(self, batch: Batch, phase: object) -> Batch:  # type: ignore[override]
        return self.sample_batch(batch)  # every batch is the student's (or the mixture's) samples

    def loss(self, ctx: StepContext, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        teacher = self.lm.teacher
        assert teacher is not None
        rows = self.student_rows(ctx, batch)
        signal = teacher.signal(batch, rows.select)
        single, parts = self.logit_loss(ctx, rows, signal, ce_weight=0.0)
        log_q = _token_logprobs(rows, self.lm.chunk_size)
        with torch.no_grad():
            log_p = _teacher_token_logprobs(signal, rows.targets, self.lm.chunk_size)
            reward = log_p - log_q.detach()
            future = _future_mean(reward, rows.select, self.mcfg.length_normalize)
            weight = torch.ones_like(log_q)
            a = self.mcfg.teacher_mix
            if a > 0:
                q, p = log_q.detach().exp(), log_p.exp()
                weight = (q / ((1 - a) * q + a * p)).clamp(max=self.mcfg.weight_clip)
        pg = -(weight * future * log_q).sum() / ctx.normalizer
        loss = single + self.mcfg.pg_weight * pg
        parts.update(
            pg=float(pg.detach()),
            reward=float(reward.mean()) if reward.numel() else 0.0,
            importance_weight=float(weight.mean()) if weight.numel() else 1.0,
        )
        return loss, parts


def _token_logprobs(rows: StudentRows, chunk: int) -> torch.Tensor:
    """log q(target) at every row, chunk by chunk, recomputing each chunk's logits in backward."""

    def piece(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = (hidden @ weight.T).float()
        return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)

    parts = [
        checkpoint(
            piece, rows.hidden[s : s + chunk], rows.weight, rows.targets[s : s + chunk], use_reentrant=False
        )
        for s in range(0, rows.hidden.shape[0], chunk)
    ]
    return torch.cat(parts) if parts else rows.hidden.new_zeros(0)


def _teacher_token_logprobs(signal: AnySignal, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """log p(target) at every row: exact from dense logits; from top-k with the tail mass shared evenly
    over the ids outside it when the teacher is sparse (a served teacher)."""
    if isinstance(signal, TeacherSignal):
        out = []
        for s in range(0, signal.num_rows, chunk):
            logits = signal.logits(s, min(s + chunk, signal.num_rows)).to(targets.device).float()
            t = targets[s : s + chunk]
            out.append(logits.gather(-1, t[:, None]).squeeze(-1) - logits.logsumexp(-1))
        return torch.cat(out) if out else targets.new_zeros(0, dtype=torch.float32)
    ids, lps = signal.ids.to(targets.device), signal.logprobs.to(targets.device).float()
    hit = ids == targets[:, None]
    tail = signal.tail_mass().to(targets.device).clamp_min(1e-12) / max(signal.vocab_size - ids.shape[1], 1)
    return torch.where(hit.any(-1), (lps * hit).sum(-1), tail.log())


def _future_mean(reward: torch.Tensor, select: torch.Tensor, normalize: bool) -> torch.Tensor:
    """For each token, the sum of the rewards of the tokens after it in its sequence (divided by their
    count when `normalize`); 0 for a sequence's last token."""
    row_of = torch.nonzero(select)[:, 0].to(reward.device)
    out = torch.zeros_like(reward)
    for b in row_of.unique().tolist():
        idx = torch.nonzero(row_of == b).flatten()
        r = reward[idx]
        after = r.flip(0).cumsum(0).flip(0) - r  # strictly later tokens
        if normalize:
            count = torch.arange(len(r) - 1, -1, -1, device=r.device, dtype=r.dtype).clamp_min(1)
            after = after / count
        out[idx] = after
    return out
