"""Teacher-generated answers (sequence-KD data), through the project's one generation engine
(`generation/engine.py`: batched, KV-cached, the shared chat prefix run once, finished rows leaving the
batch)."""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.data.records import Example
from distill.data.tokenize import prompt_ids
from distill.generation.engine import generate_tokens
from distill.generation.sampling import SamplingSpec
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
    model.eval()
    encoded = [prompt_ids(tok, ex.prompt, system_prompt) for ex in examples]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    spec = SamplingSpec(temperature=cfg.temperature if cfg.do_sample else 0.0, top_p=cfg.top_p)
    rows = generate_tokens(
        model,
        encoded,
        spec,
        cfg.max_new_tokens,
        [tok.eos_token_id],
        pad_id=pad,
        batch_size=cfg.batch_size,
        generator=torch.Generator().manual_seed(seed),
        progress=progress or NullProgress(),
        label="teacher generating",
    )
    return [
        replace(
            ex,
            completion=str(tok.decode(row.tokens, skip_special_tokens=True)).strip(),
            finished=row.finished,
        )
        for ex, row in zip(examples, rows, strict=True)
    ]
