"""Lossless speculative decoding with a feature-level drafter (EAGLE; models/feature_drafter.py).

The accept/reject rule, sampling and statistics are those of `generation.speculative`; what differs is
what the draft reads. The target's verifying forward also returns its last hidden states; the drafter's
first step of a round reads the true features of every token committed since the last round (a short
catch-up block), its later steps read its own output feature one position back. After verification the
drafter's cache keeps only the catch-up block: the drafted positions, computed from drafted features, are
rolled back and recomputed from the target's true features in the next round's catch-up (EAGLE does the
same). Both models keep K/V caches (`KVStream`), so neither ever re-reads the prompt.

With a reduced draft vocabulary the draft distribution q is defined on the K kept ids and is zero
elsewhere, so min(1, p/q) and the residual norm(max(0, p - q)) are exact and the sampler stays lossless:
tokens outside the K ids still come out, through the residual, exactly as often as the target samples them.

Alignment: drafter position t reads (target feature at t - 1, token t) and predicts token t + 1, the
token the target predicts at position t. Batches: rows accept their own counts, as in `speculative`.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from types import SimpleNamespace
from typing import Any

import torch
from transformers import PreTrainedModel

from distill.generation.engine import cache_keyword
from distill.generation.kv_stream import KVStream, left_pad, sync
from distill.generation.sampling import SamplingSpec, next_token_probs
from distill.generation.speculative import DecodeResult, _check, _next_gamma, _take, accept_drafts, draw
from distill.generation.speculative_stats import SpeculativeStats
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


def generate_feature_speculative(
    target: PreTrainedModel,
    drafter: FeatureDrafter,
    prompts: list[list[int]],
    spec: SamplingSpec,
    max_new_tokens: int,
    *,
    gamma: int = 4,
    eos_ids: Collection[int] = (),
    generator: torch.Generator | None = None,
    adaptive: bool = False,
    gamma_max: int | None = None,
    vocab: int | None = None,
) -> DecodeResult:
    """Speculative decoding of `prompts` with a feature drafter: the target's distribution exactly (as
    `generate_plain`), in fewer target forwards. Same options and `SpeculativeStats` as
    `generate_speculative`; `vocab` cuts the target's logits to the tokenizer (default: the drafter's)."""
    _check(prompts, max_new_tokens)
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    gamma_max = gamma_max if gamma_max is not None else (2 * gamma if adaptive else gamma)
    vocab = vocab if vocab is not None else drafter.vocab
    start = time.perf_counter()
    stats = SpeculativeStats()
    outs: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return DecodeResult(outs, stats)
    tview, dview = TargetView(target), DrafterView(drafter)
    tgt = KVStream(tview, len(prompts), vocab)  # type: ignore[arg-type]
    drf = KVStream(dview, len(prompts), None)  # type: ignore[arg-type]
    d2t = drafter.d2t
    # the drafter's pending inputs: features (n_b, H) beside its pending tokens `drf.pending`
    feats: list[torch.Tensor] = []
    ids, valid = left_pad([p[:-1] for p in prompts])
    if ids.shape[1]:  # everything but the last prompt token, which the first round feeds the target
        tgt.forward(ids.to(tgt.device), valid.to(tgt.device), keep=1)
        assert tview.features is not None
        width = ids.shape[1]
        for b, prompt in enumerate(prompts):  # pairs (h_{i-1}, x_i) for i = 1 .. len(prompt) - 1
            feats.append(tview.features[b, width - (len(prompt) - 1) :])
            drf.pending[b] = prompt[1:]
    else:
        feats = [torch.zeros(0, drafter.hidden, device=tgt.device) for _ in prompts]
    tgt.pending = [[p[-1]] for p in prompts]
    stats.prefill_seconds = tgt.seconds
    rows = list(range(len(prompts)))
    current = min(gamma, gamma_max)
    while rows:
        g = max(0, min(current, max(max_new_tokens - len(outs[r]) for r in rows) - 1))
        if any(not p for p in drf.pending):  # a one-token prompt: no feature to draft from yet
            g = 0
        t0 = time.perf_counter()
        d_start, d_width = drf.slots, max(len(p) for p in drf.pending)
        qs: list[torch.Tensor] = []
        xs: list[torch.Tensor] = []
        if g:
            dview.features_in = _pad_features(feats, d_width, drafter)
            logits = drf.feed_pending(keep=1)
            ones = torch.ones(len(rows), 1, dtype=torch.bool, device=drf.device)
            for i in range(g):
                if i:
                    assert dview.features is not None
                    dview.features_in = dview.features[:, -1:]
                    logits = drf.forward(xs[-1][:, None], ones, keep=1)
                q_small = next_token_probs(logits[:, -1], spec)
                pick = draw(q_small, spec, generator)
                if d2t is None:
                    qs.append(q_small)
                    xs.append(pick)
                else:  # q on the K draft ids, zero elsewhere; drafts as target ids
                    qs.append(q_small.new_zeros(len(rows), vocab).index_copy_(-1, d2t, q_small))
                    xs.append(d2t[pick])
                stats.draft_step_calls += 1
        sync(drf.device)
        t1 = time.perf_counter()
        stats.draft_seconds += t1 - t0
        t_start, t_width = tgt.slots, max(len(p) for p in tgt.pending)
        drafts = torch.stack(xs, 1).to(tgt.device) if g else torch.zeros(len(rows), 0, dtype=torch.long)
        p = next_token_probs(tgt.feed_pending(keep=g + 1, extra=drafts.to(tgt.device)), spec)
        assert tview.features is not None
        true_feats = tview.features[:, t_width - 1 :]  # at the last committed token, then each draft
        q = torch.stack(qs, 1).to(p.device) if g else p[:, :0]
        n, nxt = accept_drafts(p, q, drafts.to(p.device), generator)
        stats.verify_calls += 1
        stats.verify_seconds += time.perf_counter() - t1
        tgt.keep_new(t_start, n, first=t_width)
        if g:  # drop the drafted positions; the catch-up block (true features) stays
            drf.keep_new(d_start, torch.zeros_like(n), first=d_width)
        accepted, finished = n.tolist(), []
        drafted, nxt_list = drafts.tolist(), nxt.tolist()
        produced = 0
        for j, r in enumerate(rows):
            k, c = accepted[j], nxt_list[j]
            tgt.pending[j] = [c]
            new_tokens = [*drafted[j][:k], c]
            new_feats = true_feats[j, : k + 1].to(drf.device)
            if g:
                drf.pending[j], feats[j] = new_tokens, new_feats
            else:
                drf.pending[j] = [*drf.pending[j], *new_tokens]
                feats[j] = torch.cat([feats[j].to(drf.device), new_feats])
            before = len(outs[r])
            if _take(outs[r], new_tokens, max_new_tokens, eos_ids):
                finished.append(j)
            produced += len(outs[r]) - before
        stats.record_round(g, accepted, produced)
        if adaptive:
            current = _next_gamma(current, accepted, g, gamma_max)
        if finished:
            keep = [j for j in range(len(rows)) if j not in set(finished)]
            if not keep:
                break
            for stream in (tgt, drf):
                stream.select_rows(torch.tensor(keep))
            rows, feats = [rows[j] for j in keep], [feats[j] for j in keep]
    stats.target_calls, stats.draft_calls = tgt.calls, drf.calls
    stats.draft_forward_seconds = drf.seconds
    stats.total_seconds = time.perf_counter() - start
    return DecodeResult(outs, stats)
