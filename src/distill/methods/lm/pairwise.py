"""`pairwise`: learn from a verified (chosen) and a failed (rejected) teacher answer to one prompt.

REDI (Xu et al. 2025) by default: the chosen's per-token log-probability up, the rejected's down with the
smaller weight `alpha`, no reference model. DPO (Rafailov et al. 2023): the log-ratios to a frozen copy
of the initial student. Batches come from `data.pairs.PairStream`: chosen answers in rows [0, B),
rejected ones in rows [B, 2B), so one forward pass scores both; the loss unit is the pair.
"""

from __future__ import annotations

import copy

import torch

from distill.configs.reasoning import PairwiseConfig
from distill.data.batching import IGNORE, Batch
from distill.errors import CompatibilityError
from distill.losses.preference import dpo_loss, redi_loss, sequence_logprobs
from distill.methods.base import METHODS, Phase, StepContext
from distill.methods.lm.base import LMBody, LMContext, LMMethod


def pair_count(batch: Batch) -> int:
    """B for a batch of 2B rows (first elements, then second elements)."""
    rows = int(batch.input_ids.shape[0])
    if rows % 2:
        raise CompatibilityError(f"a batch of pairs needs an even number of rows, got {rows}")
    return rows // 2


class PairedLMMethod(LMMethod):
    """Base of the methods whose batches hold pairs: one loss unit per pair, per-row sequence scores."""

    def loss_units(self, batch: Batch, phase: Phase) -> float:
        return float(pair_count(batch))

    def row_logprobs(
        self, ctx: StepContext, batch: Batch, body: LMBody | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of the batch: the summed log-probability of its answer tokens, and their number.
        `body`: score with this (frozen) model instead of the trained student."""
        if body is None:
            rows = self.student_rows(ctx, batch)
            hidden, weight, targets, select = rows.hidden, rows.weight, rows.targets, rows.select
        else:
            select = batch.targets != IGNORE
            hidden = body(batch.input_ids, batch.attention_mask, batch.position_ids)[select]
            head = body.lm.get_output_embeddings()
            assert head is not None  # the student's head, checked when the method was built
            weight, targets = head.weight[: self.lm.vocab_size], batch.targets[select]
        row_of_token = select.nonzero()[:, 0]
        return sequence_logprobs(
            hidden, weight, targets, row_of_token, int(batch.input_ids.shape[0]), self.lm.chunk_size
        )


@METHODS.register("pairwise")
class PairwiseMethod(PairedLMMethod):
    name = "pairwise"

    def __init__(self, cfg: PairwiseConfig, ctx: LMContext) -> None:
        super().__init__(cfg, ctx)
        self.reference: LMBody | None = None
        if cfg.objective == "dpo":  # the initial student, frozen: DPO's anchor
            self.reference = LMBody(copy.deepcopy(ctx.student)).eval().requires_grad_(False)

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        out = super().frozen_modules()
        if self.reference is not None:
            out["reference"] = self.reference
        return out

    def loss(self, ctx: StepContext, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg: PairwiseConfig = self.cfg
        b = pair_count(batch)
        logp, count = self.row_logprobs(ctx, batch)
        chosen, rejected, n_chosen, n_rejected = logp[:b], logp[b:], count[:b], count[b:]
        per_token_c = chosen / n_chosen.clamp(min=1).to(chosen.dtype)
        per_token_r = rejected / n_rejected.clamp(min=1).to(rejected.dtype)
        if self.reference is not None:
            with torch.no_grad():
                ref, _ = self.row_logprobs(ctx, batch, body=self.reference)
            per_pair = dpo_loss(chosen, rejected, ref[:b], ref[b:], cfg.beta)
            margin = cfg.beta * ((chosen - ref[:b]) - (rejected - ref[b:])).detach()
        else:
            per_pair = redi_loss(chosen, rejected, n_chosen, n_rejected, cfg.alpha, cfg.length_normalize)
            margin = (per_token_c - per_token_r if cfg.length_normalize else chosen - rejected).detach()
        norm = ctx.normalizer
        objective = per_pair.sum() / norm
        loss = objective
        parts = {
            cfg.objective: float(objective.detach()),
            "chosen_logp": float(per_token_c.detach().sum()) / norm,
            "rejected_logp": float(per_token_r.detach().sum()) / norm,
            "margin": float(margin.sum()) / norm,
            "pair_accuracy": float((margin > 0).sum()) / norm,
        }
        if cfg.sft_weight > 0:
            sft = -per_token_c.sum() / norm
            loss = loss + cfg.sft_weight * sft
            parts["sft"] = float(sft.detach())
        return loss, parts
