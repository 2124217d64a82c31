"""`feature_drafter`: train an EAGLE-style drafter (models/feature_drafter.py) on the target's own hidden
states, for lossless speculative decoding (`distill speculate --draft <exported folder>`).

Per batch the target (the live teacher) runs once without gradients; its last (normed) hidden states H
give, at every position t, the drafter's input feature H[t-1], the feature the drafter must predict H[t]
and the target's next-token distribution softmax(head(H[t])). The loss at the answer positions is the
chosen divergence of the drafter's next-token distribution from the target's (through the fused chunked
head, so no (N, V) tensor exists) plus `feature_weight` x smooth-L1(h'_t, H[t]) averaged over channels
(EAGLE's feature regression). With a reduced vocabulary (`draft_vocab: K`) the target's distribution is
renormalised over the K kept ids: keeping the outside mass as a bucket would make forward KL infinite (the
drafter puts none there), and the renormalised target p|K / Z is itself an acceptance-optimal K-supported
draft (sum_k min(p_k, q_k) = Z, the most any draft on those ids can reach).

Training is teacher-forced on true features only; at decoding time the second and later draft steps read
the drafter's own features (EAGLE-1's setting; EAGLE-3's training-time test is not implemented).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from distill.configs.feature_drafter import FeatureDrafterConfig
from distill.data.batching import IGNORE, Batch
from distill.errors import CompatibilityError
from distill.losses.fused_head import chunked_head_loss
from distill.losses.tokens import DivergenceSpec
from distill.methods.base import METHODS, Phase, StepContext
from distill.methods.lm.base import LMContext, LMMethod
from distill.models.body import batch_hidden
from distill.models.feature_drafter import (
    FeatureDrafter,
    build_drafter,
    frequent_tokens,
    save_drafter,
    target_fingerprint,
)
from distill.teachers.live import LiveTeacherSource


def shifted_inputs(batch: Batch, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """The drafter's inputs for a batch: position t (t >= 1) reads the target's feature at t - 1 and the
    token at t; position 0 has no earlier feature and is dropped (it never predicts an answer token)."""
    if batch.attention_mask is None:
        raise CompatibilityError("data.packing: the feature drafter needs unpacked batches")
    return {
        "features": features[:, :-1],
        "input_ids": batch.input_ids[:, 1:],
        "attention_mask": batch.attention_mask[:, 1:],
        "position_ids": (batch.position_ids[:, 1:] - 1).clamp_min(0),
    }


@METHODS.register("feature_drafter")
class FeatureDrafterKD(LMMethod):
    """Trains only the drafter (fc, one layer, the reduced head); the target is a frozen module."""

    name = "feature_drafter"
    uses_teacher = True

    def __init__(self, cfg: FeatureDrafterConfig, ctx: LMContext) -> None:
        super().__init__(cfg, ctx)
        teacher = ctx.teacher
        if not isinstance(teacher, LiveTeacherSource):
            kind = getattr(teacher, "kind", None)
            raise CompatibilityError(
                "teacher.kind: feature_drafter reads the target's hidden states, which needs 'live' "
                f"(not {kind!r})"
            )
        self.teacher = teacher
        self.spec = DivergenceSpec(
            name=cfg.divergence, temperature=cfg.temperature, beta=cfg.beta, alpha=cfg.alpha
        )
        d2t = None
        if cfg.draft_vocab is not None:
            train = ctx.train
            if not train:
                raise CompatibilityError(
                    "method.draft_vocab: choosing the draft vocabulary needs the training examples, which "
                    "the family did not pass (LMContext.train)"
                )
            d2t = frequent_tokens((ex.input_ids for ex in train), cfg.draft_vocab, ctx.vocab_size)
        self.drafter: FeatureDrafter = build_drafter(teacher.model, ctx.vocab_size, ctx.student, d2t)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"drafter": self.drafter}

    def loss_units(self, batch: Batch, phase: Phase) -> float:
        return float((batch.targets[:, 1:] != IGNORE).sum())

    @torch.no_grad()
    def target_features(self, batch: Batch) -> torch.Tensor:
        """The target's final-normed hidden states (B, L, H), the shared prompt prefix computed once."""
        prefix = self.teacher.prefix
        return prefix.hidden(batch) if prefix is not None else batch_hidden(self.teacher.model, batch)

    def loss(self, ctx: StepContext, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        assert isinstance(cfg, FeatureDrafterConfig)
        feats = self.target_features(batch)
        select = batch.targets[:, 1:] != IGNORE
        out = ctx.modules["drafter"](**shifted_inputs(batch, feats))[select]
        nxt = feats[:, 1:][select]
        head, vocab, d2t = self.teacher.head, self.lm.vocab_size, self.drafter.d2t

        def target_logits(start: int, end: int) -> torch.Tensor:
            with torch.no_grad():
                logits = head(nxt[start:end])
                return (logits[:, d2t] if d2t is not None else logits[:, :vocab]).float()

        loss, parts = chunked_head_loss(
            out,
            self.drafter.head_weight(),
            teacher_logits=target_logits,
            spec=self.spec,
            normalizer=ctx.normalizer,
            chunk_size=self.lm.chunk_size,
            teacher_logits_fresh=True,
        )
        feature = F.smooth_l1_loss(out.float(), nxt.float(), reduction="none").mean(-1).sum() / ctx.normalizer
        named = {k: float(v) for k, v in parts.items()}
        named["feature"] = float(feature.detach())
        return loss + cfg.feature_weight * feature, named

    def eval_model(self) -> Any:
        """The drafter as a causal LM under teacher forcing (true target features at every position): what
        the family's held-out KL scores is then its first draft position. `distill speculate` is the real
        evaluation (drafted features, acceptance, speed)."""
        return TeacherForcedDrafter(self.drafter, self.teacher.model)

    def export(self, folder: Path) -> None:
        """The drafter folder (`model.safetensors` + `drafter.json`); the target's pieces are not saved."""
        fingerprint = target_fingerprint(self.teacher.model, self.lm.tokenizer)
        save_drafter(self.drafter, folder, fingerprint, method=self.cfg.model_dump(mode="json"))


class _Body(torch.nn.Module):
    """`base_model` of the teacher-forced view: the target's features, then the drafter over them."""

    def __init__(self, drafter: FeatureDrafter, target: Any) -> None:
        super().__init__()
        self.drafter, self.target = drafter, target

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **_: Any,
    ) -> SimpleNamespace:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = SimpleNamespace(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        feats = batch_hidden(self.target, batch)
        out = self.drafter(**shifted_inputs(batch, feats))  # type: ignore[arg-type]
        return SimpleNamespace(last_hidden_state=torch.cat([feats[:, :1], out], dim=1))


class _Head(torch.nn.Module):
    """Drafter logits over the target's vocabulary; with a draft vocabulary, ids outside it get the row's
    lowest kept logit minus 20 (a finite stand-in for "never proposed", so NLL and KL stay finite and
    mostly measure the target's mass outside the K ids)."""

    def __init__(self, drafter: FeatureDrafter) -> None:
        super().__init__()
        self.drafter = drafter

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.drafter.logits(hidden)
        d2t = self.drafter.d2t
        if d2t is None:
            return logits
        full = (logits.min(-1, keepdim=True).values - 20.0).expand(*logits.shape[:-1], self.drafter.vocab)
        return full.clone().index_copy_(-1, d2t, logits)


class TeacherForcedDrafter(torch.nn.Module):
    """Duck-types the parts of a causal LM that held-out evaluation uses (`base_model`, the output
    embeddings, the parameters' device); it cannot generate."""

    def __init__(self, drafter: FeatureDrafter, target: Any) -> None:
        super().__init__()
        self.base_model = _Body(drafter, target)
        self.head = _Head(drafter)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head
