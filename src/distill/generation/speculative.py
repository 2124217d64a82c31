"""Lossless speculative decoding (Leviathan et al. 2023; Chen et al. 2023) and the target-only decoder it
is measured against (the project's generation engine, with its per-call timings).

A small draft model proposes `gamma` tokens from its next-token distribution q; the target scores all
gamma + 1 positions in one forward and gives p. Draft token i is kept with probability
min(1, p(x_i) / q(x_i)); at the first rejection a token is drawn from norm(max(0, p - q)) at that
position, and when all gamma are kept a bonus token is drawn from p after them. Every produced token is
then distributed exactly as the target alone would sample it, so the draft only changes the speed.
Both p and q come from `distill.generation.sampling.next_token_probs` with one `SamplingSpec`, so the
sampler is lossless for exactly the distribution plain sampling uses (temperature, top-k, top-p).
Greedy (temperature 0) is the case where p and q are one-hot: a draft token is kept iff it is the
target's arg-max, and the output is the target's greedy output token for token.

Both models keep their K/V caches across rounds (`KVStream`); rejected positions are rolled back, the
prompt is never re-run. Batches: each row accepts its own number of tokens (per-row accept/reject, no
shared minimum, so sampling stays lossless row by row); slots one row rejected while another kept them
stay in the cache masked out for that row (see `kv_stream`), and finished rows leave the batch.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from distill.generation.engine import GenerationStats, generate_tokens, sync
from distill.generation.kv_stream import KVStream, left_pad
from distill.generation.sampling import SamplingSpec, next_token_probs, sample_from
from distill.generation.speculative_stats import SpeculativeStats


@dataclass
class PlainStats:
    """Counts and seconds of target-only decoding; adds up over runs (`merge`)."""

    new_tokens: int = 0
    target_calls: int = 0  # prefill included
    decode_calls: int = 0  # one-token forwards
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # one-token forwards only: the per-token target cost
    total_seconds: float = 0.0

    def merge(self, other: PlainStats) -> None:
        """Add another run's counts and seconds to these."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON reports."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass
class DecodeResult:
    """New tokens per prompt (the EOS token included when one ended the answer) and the run's stats."""

    tokens: list[list[int]]
    stats: Any = field(default=None)


def _take(out: list[int], new: list[int], max_new_tokens: int, eos: Collection[int]) -> bool:
    """Append `new` to a row's output, cut at the first EOS or at `max_new_tokens`; True when finished."""
    for tok in new:
        if len(out) >= max_new_tokens:
            return True
        out.append(tok)
        if tok in eos:
            return True
    return len(out) >= max_new_tokens


def draw(probs: torch.Tensor, spec: SamplingSpec, generator: torch.Generator | None) -> torch.Tensor:
    """`sample_from`, with the greedy case as an arg-max: the same token (a one-hot row has one id of
    non-zero mass), without a multinomial draw over the whole vocabulary on every draft step."""
    return probs.argmax(-1) if spec.greedy else sample_from(probs, generator)


def _check(prompts: list[list[int]], max_new_tokens: int) -> None:
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def generate_plain(
    model: PreTrainedModel,
    prompts: list[list[int]],
    spec: SamplingSpec,
    max_new_tokens: int,
    *,
    eos_ids: Collection[int] = (),
    generator: torch.Generator | None = None,
    vocab: int | None = None,
) -> DecodeResult:
    """Target-only decoding: the project's generation engine (K/V cache, the same sampling code as the
    speculative sampler), as one batch with no shared-prefix saving, so the baseline pays what the
    speculative decoder pays for the prompt. Stops a row at an EOS id or `max_new_tokens`."""
    _check(prompts, max_new_tokens)
    start = time.perf_counter()
    stats = PlainStats()
    if max_new_tokens == 0:
        return DecodeResult([[] for _ in prompts], stats)
    run = GenerationStats()
    rows = generate_tokens(
        model,
        prompts,
        spec,
        max_new_tokens,
        list(eos_ids),
        pad_id=0,
        batch_size=len(prompts),
        generator=generator,
        use_shared_prefix=False,
        stats=run,
        vocab=vocab,
    )
    stats.new_tokens, stats.target_calls, stats.decode_calls = (
        run.new_tokens,
        run.forward_calls,
        run.decode_calls,
    )
    stats.prefill_seconds, stats.decode_seconds = run.prefill_seconds, run.decode_seconds
    stats.total_seconds = time.perf_counter() - start
    return DecodeResult([r.tokens for r in rows], stats)


def accept_drafts(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lossless accept/reject step of one round, row by row.

    p (R, g+1, V): target probabilities at the g draft positions and after them; q (R, g, V): draft
    probabilities the drafts (R, g) were sampled from. Returns (accepted count n per row, the next token
    per row): drafts 0..n-1 kept, then a token from norm(max(0, p - q)) at position n, which is p itself
    when all g were kept (q is taken as 0 past the drafts)."""
    rows, g = drafts.shape
    if g:
        p_x = p[:, :g].gather(-1, drafts[..., None]).squeeze(-1)
        q_x = q.gather(-1, drafts[..., None]).squeeze(-1)
        r = torch.rand(rows, g, generator=generator, device=p.device)
        kept = r * q_x < p_x  # P(kept) = min(1, p/q); q_x > 0 since x was drawn from q
        n = kept.long().cumprod(-1).sum(-1)
    else:
        n = torch.zeros(rows, dtype=torch.long, device=p.device)
    q_ext = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)
    at = n[:, None, None].expand(rows, 1, p.shape[-1])
    p_n, q_n = p.gather(1, at).squeeze(1), q_ext.gather(1, at).squeeze(1)
    residual = (p_n - q_n).clamp_min(0.0)
    mass = residual.sum(-1, keepdim=True)
    # a rejection implies p(x) < q(x), hence positive residual mass; the guard only catches round-off
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_n)
    return n, sample_from(residual, generator)


def _next_gamma(gamma: int, accepted: list[int], round_gamma: int, gamma_max: int) -> int:
    """Adaptive gamma: one more after a round every row accepted fully, one fewer when rows on average
    rejected in the first half of their drafts."""
    mean = sum(accepted) / len(accepted)
    if round_gamma and all(n == round_gamma for n in accepted):
        return min(gamma + 1, gamma_max)
    if mean < round_gamma / 2:
        return max(gamma - 1, 1)
    return gamma


class DraftSide:
    """The draft's part in the rounds of `generate_speculative`. This one drafts from token ids alone (a
    small LM with its own cache); `feature_speculative` overrides the hooks where a drafter reads more."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.stream: KVStream

    def open(self, target: PreTrainedModel, prompts: list[list[int]], vocab: int | None) -> KVStream:
        """Build both caches and feed them all but each prompt's last token, which the first round feeds;
        returns the target's stream."""
        tgt, self.stream = KVStream(target, len(prompts), vocab), KVStream(self.model, len(prompts), vocab)
        ids, valid = left_pad([p[:-1] for p in prompts])
        if ids.shape[1]:
            for stream in (tgt, self.stream):
                stream.forward(ids.to(stream.device), valid.to(stream.device), keep=1)
        for stream in (tgt, self.stream):
            stream.pending = [[p[-1]] for p in prompts]
        return tgt

    def can_draft(self) -> bool:
        """Whether every row has what a draft step reads (else the round only verifies)."""
        return True

    def prepare_first(self, width: int) -> None:
        """Set what the round's first step reads besides its `width` pending ids (nothing here)."""

    def prepare_next(self) -> None:
        """Set what a later step reads besides the last drafted id (nothing here)."""

    def to_target(self, q: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A step's distribution and drafted ids over the target's vocabulary (already are here)."""
        return q, x

    def propose(
        self,
        g: int,
        width: int,
        spec: SamplingSpec,
        generator: torch.Generator | None,
        stats: SpeculativeStats,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Draft g >= 1 tokens per row: their distributions q and the drafted ids."""
        qs: list[torch.Tensor] = []
        xs: list[torch.Tensor] = []
        self.prepare_first(width)
        logits = self.stream.feed_pending(keep=1)
        ones = torch.ones(len(self.stream.pending), 1, dtype=torch.bool, device=self.stream.device)
        for i in range(g):
            if i:
                self.prepare_next()
                logits = self.stream.forward(xs[-1][:, None], ones, keep=1)
            q = next_token_probs(logits[:, -1], spec)
            q, x = self.to_target(q, draw(q, spec, generator))
            qs.append(q)
            xs.append(x)
            stats.draft_step_calls += 1
        return qs, xs

    def verified(self, width: int) -> None:
        """Called right after the target's verifying forward (`width`: its pending block's width)."""

    def roll_back(self, start: int, width: int, accepted: torch.Tensor, g: int) -> None:
        """After a round that drafted g >= 1: keep the pending block and the accepted drafts but the last
        (the draft never fed its own last token)."""
        self.stream.keep_new(start, accepted.clamp(max=g - 1), first=width)

    def commit(self, j: int, new: list[int], g: int) -> None:
        """Queue row j's committed tokens `new` (kept drafts, then the next token) for the draft's next feed:
        only those its cache lacks."""
        pending = self.stream.pending
        if not g:
            pending[j] = [*pending[j], *new]
        else:
            pending[j] = new[-2:] if len(new) == g + 1 else new[-1:]

    def select_rows(self, keep: list[int]) -> None:
        """Keep only these rows (finished rows leave the batch)."""
        self.stream.select_rows(torch.tensor(keep))


def generate_speculative(
    target: PreTrainedModel,
    draft: PreTrainedModel | DraftSide,
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
    """Speculative decoding of `prompts` (token ids, any lengths): the same distribution as
    `generate_plain` on the target, with fewer target forwards when the draft agrees with it.

    `draft`: a small LM, or a `DraftSide` for other drafters. `adaptive` moves gamma within [1, gamma_max]
    (default 2 * gamma) after each round. `vocab` cuts the logits to the shared tokenizer's size (heads
    padded past it). Returns the new tokens per prompt and `SpeculativeStats`."""
    _check(prompts, max_new_tokens)
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    gamma_max = gamma_max if gamma_max is not None else (2 * gamma if adaptive else gamma)
    start = time.perf_counter()
    stats = SpeculativeStats()
    outs: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return DecodeResult(outs, stats)
    side = draft if isinstance(draft, DraftSide) else DraftSide(draft)
    tgt = side.open(target, prompts, vocab)
    drf = side.stream
    stats.prefill_seconds, draft_prefill = tgt.seconds + drf.seconds, drf.seconds
    rows = list(range(len(prompts)))
    current = min(gamma, gamma_max)
    while rows:
        g = max(0, min(current, max(max_new_tokens - len(outs[r]) for r in rows) - 1))
        if not side.can_draft():
            g = 0
        t0 = time.perf_counter()
        d_start, d_width = drf.slots, max(len(p) for p in drf.pending)
        qs, xs = side.propose(g, d_width, spec, generator, stats) if g else ([], [])
        sync(drf.device)
        t1 = time.perf_counter()
        stats.draft_seconds += t1 - t0
        t_start, t_width = tgt.slots, max(len(p) for p in tgt.pending)
        drafts = torch.stack(xs, 1).to(tgt.device) if g else torch.zeros(len(rows), 0, dtype=torch.long)
        p = next_token_probs(tgt.feed_pending(keep=g + 1, extra=drafts.to(tgt.device)), spec)
        side.verified(t_width)
        q = torch.stack(qs, 1).to(p.device) if g else p[:, :0]
        n, nxt = accept_drafts(p, q, drafts.to(p.device), generator)
        stats.verify_calls += 1
        stats.verify_seconds += time.perf_counter() - t1
        tgt.keep_new(t_start, n, first=t_width)
        if g:
            side.roll_back(d_start, d_width, n, g)
        accepted, finished = n.tolist(), []
        drafted, nxt_list = drafts.tolist(), nxt.tolist()
        produced = 0
        for j, r in enumerate(rows):
            new = [*drafted[j][: accepted[j]], nxt_list[j]]
            tgt.pending[j] = new[-1:]
            side.commit(j, new, g)
            before = len(outs[r])
            if _take(outs[r], new, max_new_tokens, eos_ids):
                finished.append(j)
            produced += len(outs[r]) - before
        stats.record_round(g, accepted, produced)
        if adaptive:
            current = _next_gamma(current, accepted, g, gamma_max)
        if finished:
            keep = [j for j in range(len(rows)) if j not in set(finished)]
            if not keep:
                break
            tgt.select_rows(torch.tensor(keep))
            side.select_rows(keep)
            rows = [rows[j] for j in keep]
    stats.target_calls, stats.draft_calls = tgt.calls, drf.calls
    stats.draft_forward_seconds = drf.seconds - draft_prefill
    stats.total_seconds = time.perf_counter() - start
    return DecodeResult(outs, stats)


def eos_token_ids(model: PreTrainedModel, tokenizer: Any = None) -> set[int]:
    """End ids a decoder stops at: the tokenizer's EOS and the model's generation config's (one or a list)."""
    ids: set[int] = set()
    for source in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(model.generation_config, "eos_token_id", None),
    ):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return ids
