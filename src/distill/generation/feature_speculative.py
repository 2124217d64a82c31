"""Lossless speculative decoding with a feature-level drafter (EAGLE; models/feature_drafter.py).

The rounds, accept/reject rule, sampling and statistics are those of `generation.speculative` (this module
gives it a `DraftSide`); what differs is what the draft reads. The target's verifying forward also returns
its last hidden states; the drafter's first step of a round reads the true features of every token committed
since the last round (a short catch-up block), its later steps read its own output feature one position
back. After verification the drafter's cache keeps only the catch-up block: the drafted positions, computed
from drafted features, are rolled back and recomputed from the target's true features in the next round's
catch-up (EAGLE does the same). Both models keep K/V caches (`KVStream`), so neither ever re-reads the
prompt.

With a reduced draft vocabulary the draft distribution q is defined on the K kept ids and is zero
elsewhere, so min(1, p/q) and the residual norm(max(0, p - q)) are exact and the sampler stays lossless:
tokens outside the K ids still come out, through the residual, exactly as often as the target samples them.

Alignment: drafter position t reads (target feature at t - 1, token t) and predicts token t + 1, the
token the target predicts at position t. Batches: rows accept their own counts, as in `speculative`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from transformers import PreTrainedModel

from distill.generation.engine import cache_keyword
from distill.generation.kv_stream import KVStream, left_pad
from distill.generation.speculative import DecodeResult, DraftSide, generate_speculative
from distill.models.feature_drafter import FeatureDrafter


class TargetView(torch.nn.Module):
    """The target as `KVStream` drives it, keeping the last (normed) hidden states of every fed position."""

    def __init__(self, target: PreTrainedModel) -> None:
        super().__init__()
        self.target = target
        self.config = target.config
        self.features: torch.Tensor | None = None
        self._cache_kw = cache_keyword(target)

    def forward(
        self, input_ids: torch.Tensor, cache: Any = None, logits_to_keep: int = 0, **kwargs: Any
    ) -> Any:
        kwargs[self._cache_kw] = cache
        out = self.target(
            input_ids=input_ids, logits_to_keep=logits_to_keep, output_hidden_states=True, **kwargs
        )
        self.features = out.hidden_states[-1]  # after the final norm (checked in the tests)
        return out


class DrafterView(torch.nn.Module):
    """The drafter as `KVStream` drives it: `features_in` (B, W, H) is set before each call; the output
    features are kept for the next step; logits are over the target's vocabulary or the K draft ids."""

    def __init__(self, drafter: FeatureDrafter) -> None:
        super().__init__()
        self.drafter = drafter
        self.config = drafter.config
        self.features_in: torch.Tensor | None = None
        self.features: torch.Tensor | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Any = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        use_cache: bool = True,
    ) -> Any:
        assert self.features_in is not None and self.features_in.shape[:2] == input_ids.shape
        feats = self.drafter(self.features_in, input_ids, attention_mask, position_ids, cache=cache)
        self.features = feats
        keep = logits_to_keep or feats.shape[1]
        return SimpleNamespace(logits=self.drafter.logits(feats[:, -keep:]))


def _pad_features(rows: list[torch.Tensor], width: int, drafter: FeatureDrafter) -> torch.Tensor:
    """Per-row features (n_b, H) left-padded with zeros to (B, width, H), as `feed_pending` pads the ids."""
    weight = drafter.fc.weight
    out = weight.new_zeros(len(rows), width, drafter.hidden)
    for b, r in enumerate(rows):
        if len(r):
            out[b, width - len(r) :] = r
    return out


class FeatureDraftSide(DraftSide):
    """The feature drafter's part in `generate_speculative`'s rounds: its pending inputs are features
    (n_b, H) beside its pending tokens, the target's true features of what was committed since the last
    draft; drafted positions leave its cache after each round."""

    def __init__(self, drafter: FeatureDrafter) -> None:
        self.drafter = drafter
        self.view = DrafterView(drafter)
        self.feats: list[torch.Tensor] = []
        self.true_feats = torch.zeros(0)

    def open(self, target: PreTrainedModel, prompts: list[list[int]], vocab: int | None) -> KVStream:
        """Feed the target all but each prompt's last token; the drafter gets the pairs
        (h_{i-1}, x_i) for i = 1 .. len(prompt) - 1 as its first catch-up block."""
        self.tview, self.vocab = TargetView(target), vocab
        tgt = KVStream(self.tview, len(prompts), vocab)  # type: ignore[arg-type]
        self.stream = KVStream(self.view, len(prompts), None)  # type: ignore[arg-type]
        ids, valid = left_pad([p[:-1] for p in prompts])
        if ids.shape[1]:
            tgt.forward(ids.to(tgt.device), valid.to(tgt.device), keep=1)
            assert self.tview.features is not None
            width = ids.shape[1]
            for b, prompt in enumerate(prompts):
                self.feats.append(self.tview.features[b, width - (len(prompt) - 1) :])
                self.stream.pending[b] = prompt[1:]
        else:
            self.feats = [torch.zeros(0, self.drafter.hidden, device=tgt.device) for _ in prompts]
        tgt.pending = [[p[-1]] for p in prompts]
        return tgt

    def can_draft(self) -> bool:
        """False while a one-token prompt has no feature to draft from yet."""
        return all(self.stream.pending)

    def prepare_first(self, width: int) -> None:
        self.view.features_in = _pad_features(self.feats, width, self.drafter)

    def prepare_next(self) -> None:
        assert self.view.features is not None
        self.view.features_in = self.view.features[:, -1:]

    def to_target(self, q: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """With a reduced draft vocabulary: q on the K draft ids, zero elsewhere; drafts as target ids."""
        d2t = self.drafter.d2t
        if d2t is None:
            return q, x
        assert self.vocab is not None
        return q.new_zeros(q.shape[0], self.vocab).index_copy_(-1, d2t, q), d2t[x]

    def verified(self, width: int) -> None:
        assert self.tview.features is not None
        self.true_feats = self.tview.features[:, width - 1 :]  # at the last committed token, then each draft

    def roll_back(self, start: int, width: int, accepted: torch.Tensor, g: int) -> None:
        """Drop the drafted positions; the catch-up block (true features) stays."""
        self.stream.keep_new(start, torch.zeros_like(accepted), first=width)

    def commit(self, j: int, new: list[int], g: int) -> None:
        """The next catch-up block: the committed tokens with the target's features before each."""
        new_feats = self.true_feats[j, : len(new)].to(self.stream.device)
        if g:
            self.stream.pending[j], self.feats[j] = new, new_feats
        else:
            self.stream.pending[j] = [*self.stream.pending[j], *new]
            self.feats[j] = torch.cat([self.feats[j].to(self.stream.device), new_feats])

    def select_rows(self, keep: list[int]) -> None:
        super().select_rows(keep)
        self.feats = [self.feats[j] for j in keep]


def generate_feature_speculative(
    target: PreTrainedModel, drafter: FeatureDrafter, *args: Any, **options: Any
) -> DecodeResult:
    """`generate_speculative` (same arguments and `SpeculativeStats`: the target's distribution exactly, in
    fewer target forwards) drafting with a feature drafter; `vocab` cuts the target's logits to the
    tokenizer (default: the drafter's)."""
    if options.get("vocab") is None:
        options["vocab"] = drafter.vocab
    return generate_speculative(target, FeatureDraftSide(drafter), *args, **options)
