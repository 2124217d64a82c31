"""Teacher-generated answers (sequence-KD data): batched, KV-cached generation from the chat prompt.

Prompts are sorted by length so each batch pads little; left padding so every row continues from its
own last prompt token.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.data.records import Example
from distill.data.tokenize import prompt_ids
from distill.progress import NullProgress, Progress
from distill.recipe import GenerateConfig


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    examples: list[Example],
    cfg: GenerateConfig,
    *,
    system_prompt: str | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[Example]:
    """Return copies of `examples` whose completion is the teacher's answer (prompt order kept)."""
    progress = progress or NullProgress()
    model.eval()
    device = next(model.parameters()).device
    encoded = [prompt_ids(tok, ex.prompt, system_prompt) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: len(encoded[i]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    answers: dict[int, str] = {}
    finished: dict[int, bool] = {}
    gen = torch.Generator().manual_seed(seed)
    progress.start("teacher generating", len(examples))
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(encoded[i])
            ids[r, width - n :] = torch.tensor(encoded[i])
            mask[r, width - n :] = 1
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        out = model.generate(  # type: ignore[operator]
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=cfg.max_new_tokens,
            do_sample=cfg.do_sample,
            temperature=cfg.temperature if cfg.do_sample else None,
            top_p=cfg.top_p if cfg.do_sample else None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
        )
        for r, i in enumerate(idx):
            new = out[r, width:]
            answers[i] = str(tok.decode(new, skip_special_tokens=True)).strip()
            finished[i] = bool((new == tok.eos_token_id).any())
        progress.advance(len(idx))
    progress.finish()
    return [replace(ex, completion=answers[i], finished=finished[i]) for i, ex in enumerate(examples)]
