"""The generation engine behind everything in the project that samples from a causal LM: teacher answers
(sequence-KD data), student rollouts (on-policy KD, drafter data). Batched and KV-cached, with two
savings over a plain `generate` loop:

- the prompt prefix every row of a batch shares (chat header, system prompt) runs once, at batch size 1,
  and its keys/values are expanded to the batch;
- a row that has finished (EOS or its budget) leaves the batch, so late steps run only the rows still
  writing.

Layout of a batch: [shared prefix][left padding][rest of the prompt], with explicit position ids, so each
row's tokens sit at the positions a plain forward over that row alone gives them. Greedy output equals HF
`generate` on the same prompts (tested), up to float rounding in near-ties between two tokens.

`GenerationStats` also times the forwards (device-synchronised), prompt passes apart from one-token decode
steps, so the target-only baseline of speculative decoding measures this same loop.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from distill.generation.growing_cache import growing_cache
from distill.generation.sampling import SamplingSpec, next_token_probs, sample_from
from distill.progress import NullProgress, Progress


@dataclass
class Generated:
    tokens: list[int]  # new tokens, EOS included when the row stopped on it
    finished: bool  # stopped on an EOS token (not on the budget)


@dataclass
class Mixer:
    """Sample from (1 - weight) * model + weight * `other` (MiniLLM's teacher-mixed sampling): `other`
    runs beside the model with its own cache; both distributions cover the first `vocab` ids."""

    other: Any
    weight: float
    vocab: int


@dataclass
class GenerationStats:
    prefix_tokens_saved: int = 0  # prompt tokens not run because a shared prefix ran once
    row_steps_saved: int = 0  # decode (row, step) slots not run because the row had finished
    forward_calls: int = 0  # prompt passes included
    decode_calls: int = 0  # one-token forwards
    new_tokens: int = 0
    prefill_seconds: float = 0.0  # forwards over prompt tokens (shared prefix included)
    decode_seconds: float = 0.0  # one-token forwards only: the per-token cost of the model


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings charge each forward to the phase that ran it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_keyword(model: Any) -> str:
    """The keyword a model's forward takes its K/V cache under: `cache` in current transformers
    (`past_key_values` is deprecated there, removed in 5.40), `past_key_values` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix every prompt starts with, always leaving each prompt >= 1 token of its
    own (the last prompt token must run in the batched pass to give the first next-token logits)."""
    shortest = min(len(p) for p in prompts)
    n = 0
    first = prompts[0]
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


@torch.no_grad()
def generate_tokens(
    model: Any,
    prompts: Sequence[Sequence[int]],
    spec: SamplingSpec,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    *,
    pad_id: int,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
    use_shared_prefix: bool = True,
    min_prefix: int = 4,
    stats: GenerationStats | None = None,
    progress: Progress | None = None,
    label: str = "generating",
    mixer: Mixer | None = None,
    vocab: int | None = None,
) -> list[Generated]:
    """New tokens for every prompt (in prompt order). Prompts are batched by length so rows pad little;
    `generator` makes sampling reproducible (draws happen in batch order). `vocab` cuts the model's
    logits to the tokenizer's size (heads padded past it)."""
    progress = progress or NullProgress()
    stats = stats if stats is not None else GenerationStats()
    if max_new_tokens <= 0:
        return [Generated(tokens=[], finished=False) for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Generated | None] = [None] * len(prompts)
    progress.start(label, len(prompts))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = _generate_batch(
            model,
            [list(prompts[i]) for i in idx],
            spec,
            max_new_tokens,
            set(eos_ids),
            pad_id=pad_id,
            generator=generator,
            prefix_len=shared_prefix([prompts[i] for i in idx]) if use_shared_prefix else 0,
            min_prefix=min_prefix,
            stats=stats,
            mixer=mixer,
            vocab=vocab,
        )
        for i, row in zip(idx, rows, strict=True):
            out[i] = row
            stats.new_tokens += len(row.tokens)
        progress.advance(len(idx))
    progress.finish()
    return [r for r in out if r is not None]


def _generate_batch(
    model: Any,
    prompts: list[list[int]],
    spec: SamplingSpec,
    max_new_tokens: int,
    eos: set[int],
    *,
    pad_id: int,
    generator: torch.Generator | None,
    prefix_len: int,
    min_prefix: int,
    stats: GenerationStats,
    mixer: Mixer | None,
    vocab: int | None,
) -> list[Generated]:
    device = next(model.parameters()).device
    bsz = len(prompts)
    if prefix_len < min_prefix or bsz < 2:
        prefix_len = 0
    room = max(len(p) for p in prompts) + max_new_tokens
    runners = [_Runner(model, vocab, room)] + (
        [_Runner(mixer.other, None, room)] if mixer is not None else []
    )
    started = time.perf_counter()
    if prefix_len:
        prefix = torch.tensor([prompts[0][:prefix_len]], device=device)
        for runner in runners:
            runner(input_ids=prefix)
            runner.cache.batch_repeat_interleave(bsz)
        stats.forward_calls += 1
        stats.prefix_tokens_saved += prefix_len * (bsz - 1)
    rests = [p[prefix_len:] for p in prompts]
    width = max(len(r) for r in rests)
    ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    mask = torch.zeros((bsz, prefix_len + width), dtype=torch.long)
    mask[:, :prefix_len] = 1
    pos = torch.zeros((bsz, width), dtype=torch.long)
    for b, rest in enumerate(rests):
        n = len(rest)
        ids[b, width - n :] = torch.tensor(rest)
        mask[:, prefix_len:][b, width - n :] = 1
        pos[b, width - n :] = torch.arange(prefix_len, prefix_len + n)
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    logits = [runner(input_ids=ids, attention_mask=mask, position_ids=pos) for runner in runners]
    sync(device)
    stats.prefill_seconds += time.perf_counter() - started
    stats.forward_calls += 1
    next_pos = pos[:, -1] + 1
    tokens: list[list[int]] = [[] for _ in range(bsz)]
    finished = [False] * bsz
    alive = list(range(bsz))  # original row of each batch row still generating
    for step in range(max_new_tokens):
        probs = _mixed_probs(logits, spec, mixer)
        new = probs.argmax(-1) if spec.greedy else sample_from(probs, generator)
        keep: list[int] = []
        for j, row in enumerate(alive):
            tok = int(new[j])
            tokens[row].append(tok)
            if tok in eos:
                finished[row] = True
            else:
                keep.append(j)
        if step == max_new_tokens - 1 or not keep:
            break
        if len(keep) < len(alive):
            stats.row_steps_saved += (len(alive) - len(keep)) * (max_new_tokens - 1 - step)
            sel = torch.tensor(keep, device=device)
            for runner in runners:
                runner.cache.batch_select_indices(sel)
            mask, next_pos, new = mask[sel], next_pos[sel], new[sel]
            alive = [alive[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        started = time.perf_counter()
        logits = [
            runner(input_ids=new[:, None], attention_mask=mask, position_ids=next_pos[:, None])
            for runner in runners
        ]
        sync(device)
        stats.decode_seconds += time.perf_counter() - started
        stats.forward_calls += 1
        stats.decode_calls += 1
        next_pos = next_pos + 1
    return [Generated(tokens=t, finished=f) for t, f in zip(tokens, finished, strict=True)]


class _Runner:
    """One model and its K/V cache: each call runs new tokens and returns the last position's logits
    (cut to `vocab` ids when given)."""

    def __init__(self, model: Any, vocab: int | None, room: int = 0) -> None:
        self.model = model
        self.vocab = vocab
        self.keyword = cache_keyword(model)
        self.cache = growing_cache(model.config, reserve=room)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(**inputs, use_cache=True, logits_to_keep=1, **{self.keyword: self.cache})
        logits: torch.Tensor = out.logits[:, -1, : self.vocab]
        return logits


def _mixed_probs(logits: list[torch.Tensor], spec: SamplingSpec, mixer: Mixer | None) -> torch.Tensor:
    if mixer is None:
        return next_token_probs(logits[0], spec)
    own = next_token_probs(logits[0][:, : mixer.vocab], spec)
    other = next_token_probs(logits[1][:, : mixer.vocab], spec)
    return (1.0 - mixer.weight) * own + mixer.weight * other
