"""Draw n teacher samples per prompt for the data factory: from local weights through the project's
generation engine, or from a served teacher (vLLM batches the concurrent requests). Both are seeded per
call, so a factory shard's samples depend only on its prompts and its seed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from distill.configs.factory import FactoryConfig
from distill.errors import RecipeError
from distill.generation.engine import generate_tokens
from distill.generation.sampling import SamplingSpec
from distill.progress import NullProgress, Progress
from distill.teachers.factory import TeacherHandle


class Sampler(Protocol):
    ident: str  # fingerprint of the teacher and sampling settings (part of the factory's fingerprint)

    def sample(self, prompts: list[list[int]], n: int, seed: int) -> list[list[tuple[str, bool]]]:
        """Per prompt, `n` (text, finished) pairs; `finished` is False when cut at max_new_tokens."""
        ...


def _ident(kind: str, teacher: TeacherHandle, cfg: FactoryConfig) -> str:
    return f"{kind}:{teacher.ident}:t={cfg.temperature}:top_p={cfg.top_p}:max_new_tokens={cfg.max_new_tokens}"


@dataclass
class LiveSampler:
    """Local weights: every prompt repeated n times in one generate_tokens call (the repeats sort next to
    each other, so a batch shares its whole prompt as prefix), one torch.Generator seeded by `seed`."""

    model: Any
    tokenizer: Any
    spec: SamplingSpec
    max_new_tokens: int
    batch_size: int
    ident: str
    progress: Progress = field(default_factory=NullProgress)

    def sample(self, prompts: list[list[int]], n: int, seed: int) -> list[list[tuple[str, bool]]]:
        tok = self.tokenizer
        repeated = [p for p in prompts for _ in range(n)]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows = generate_tokens(
            self.model,
            repeated,
            self.spec,
            self.max_new_tokens,
            [tok.eos_token_id],
            pad_id=pad,
            batch_size=self.batch_size,
            generator=torch.Generator().manual_seed(seed),
            progress=self.progress,
            label="teacher sampling",
        )
        texts = [(str(tok.decode(r.tokens, skip_special_tokens=True)).strip(), r.finished) for r in rows]
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


@dataclass
class ServedSampler:
    """A served teacher: one request per sample index j over all prompts; prompt i of request j is seeded
    with seed + j * len(prompts) + i (the server adds i), so every sample of a call has its own seed."""

    remote: Any
    temperature: float
    top_p: float
    max_new_tokens: int
    ident: str

    def sample(self, prompts: list[list[int]], n: int, seed: int) -> list[list[tuple[str, bool]]]:
        out: list[list[tuple[str, bool]]] = [[] for _ in prompts]
        for j in range(n):
            gens = self.remote.generate(
                prompts, self.max_new_tokens, self.temperature, self.top_p, seed + j * len(prompts)
            )
            for row, g in zip(out, gens, strict=True):
                row.append((str(g.text).strip(), bool(g.finished)))
        return out


def live_sampler(
    teacher: TeacherHandle, cfg: FactoryConfig, *, progress: Progress | None = None
) -> LiveSampler:
    if teacher.model is None:
        raise RecipeError("factory: sampling needs the teacher's weights (a live teacher or a local copy)")
    teacher.model.eval()
    return LiveSampler(
        teacher.model,
        teacher.tokenizer,
        SamplingSpec(temperature=cfg.temperature, top_p=cfg.top_p),
        cfg.max_new_tokens,
        cfg.batch_size,
        _ident("live", teacher, cfg),
        progress or NullProgress(),
    )


def served_sampler(teacher: TeacherHandle, cfg: FactoryConfig) -> ServedSampler:
    if teacher.remote is None or not hasattr(teacher.remote, "generate"):
        raise RecipeError("factory: this teacher is not served; it cannot generate through a server")
    return ServedSampler(
        teacher.remote, cfg.temperature, cfg.top_p, cfg.max_new_tokens, _ident("served", teacher, cfg)
    )


def teacher_sampler(
    teacher: TeacherHandle, cfg: FactoryConfig, *, progress: Progress | None = None
) -> Sampler:
    """The server for a served teacher, else the local weights."""
    if teacher.kind == "served" and teacher.remote is not None:
        return served_sampler(teacher, cfg)
    return live_sampler(teacher, cfg, progress=progress)
