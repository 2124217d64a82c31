"""`step_by_step`: Distilling Step-by-Step (Hsieh et al. 2023). Each verified teacher answer gives two
tasks told apart by a prefix on the user message: the final answer (rows [0, B) of a `PairStream` batch)
and the rationale (rows [B, 2B)). Multi-task training lets the rationale shape what the student learns
while it answers without writing one at evaluation. Each row's loss is its mean token NLL, so a long
rationale weighs no more than a short answer; `rationale_weight` sets the balance of the two tasks."""

from __future__ import annotations

import torch

from distill.configs.reasoning import StepByStepConfig
from distill.data.batching import Batch
from distill.methods.base import METHODS, StepContext
from distill.methods.lm.pairwise import PairedLMMethod, pair_count


@METHODS.register("step_by_step")
class StepByStepMethod(PairedLMMethod):
    name = "step_by_step"

    def loss(self, ctx: StepContext, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg: StepByStepConfig = self.cfg
        b = pair_count(batch)
        logp, count = self.row_logprobs(ctx, batch)
        nll = -logp / count.clamp(min=1).to(logp.dtype)
        label = nll[:b].sum() / ctx.normalizer
        rationale = nll[b:].sum() / ctx.normalizer
        loss = label + cfg.rationale_weight * rationale
        return loss, {"label": float(label.detach()), "rationale": float(rationale.detach())}
