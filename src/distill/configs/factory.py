"""The reasoning data factory's recipe section (torch-free): which prompts, how many teacher samples per
prompt, how the held-out prompts are split off, and how samples are verified, deduplicated and filtered
(implementation: reasoning/factory.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distill.configs.base import Strict


class TaskSpec(Strict):
    """`count` prompts of the generated task family `name` (reasoning/tasks.py; the name is checked when the
    factory runs, so the task list can grow without touching the recipe schema)."""

    name: str
    count: int = Field(ge=1)


class DedupConfig(Strict):
    """Duplicate removal among the verified-correct samples: exact (whitespace-normalised text) and near
    (word `ngram` Jaccard >= `near_threshold`; None: off), among the samples of one prompt (`scope:
    prompt`) or across the whole data (`scope: all`, MinHash + LSH so it stays near-linear)."""

    exact: bool = True
    near_threshold: float | None = Field(default=0.8, gt=0, le=1)
    ngram: int = Field(default=3, ge=1)
    scope: Literal["prompt", "all"] = "prompt"


class FilterConfig(Strict):
    """What a verified sample must also be to be kept: with an `Answer:` line (`require_answer`, the format
    filter), ended by the teacher rather than cut at max_new_tokens (`require_finished`), and within
    `min_chars`..`max_chars` characters."""

    require_answer: bool = True
    require_finished: bool = True
    min_chars: int | None = Field(default=None, ge=0)
    max_chars: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _range(self) -> FilterConfig:
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError("min_chars must not exceed max_chars")
        return self


class SandboxLimitsConfig(Strict):
    """Limits for each run of an untrusted program (the `program` verifier)."""

    cpu_s: float = Field(default=2.0, gt=0)
    wall_s: float = Field(default=10.0, gt=0)
    memory_mb: int = Field(default=512, ge=16)


class FactoryConfig(Strict):
    """Generate `samples` teacher answers per training prompt, verify them, deduplicate and filter: the
    kept samples are the training data, the unfiltered ones the baseline. Prompts come from a JSONL file of
    task rows (`prompts`) or from task generators (`tasks`). A `heldout` fraction of the prompts (per task,
    seeded) is split off before any generation and gets no training samples. Every stage is written to
    `output` as it finishes, generation in shards of `shard_size` prompts, so a stopped run resumes."""

    prompts: str | None = None
    tasks: list[TaskSpec] | None = None
    samples: int = Field(default=4, ge=1)
    temperature: float = Field(default=0.8, ge=0)  # 0: greedy (every sample of a prompt alike)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_new_tokens: int = Field(default=128, ge=1)
    batch_size: int = Field(default=32, ge=1)
    heldout: float = Field(default=0.2, gt=0, lt=1)
    heldout_samples: int = Field(default=0, ge=0)  # teacher samples per held-out prompt: its own accuracy
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    contamination_ngram: int = Field(default=8, ge=1)
    shard_size: int = Field(default=64, ge=1)
    output: str = "runs/{name}/factory"
    allow_unisolated: bool = False  # run program checks without OS isolation (trusted teachers only)
    sandbox: SandboxLimitsConfig = Field(default_factory=SandboxLimitsConfig)
    max_pairs_per_prompt: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> FactoryConfig:
        if (self.prompts is None) == (self.tasks is None):
            raise ValueError("give exactly one of prompts (a JSONL file of task rows) and tasks")
        if self.tasks is not None:
            if not self.tasks:
                raise ValueError("tasks: give at least one task")
            names = [t.name for t in self.tasks]
            if len(set(names)) != len(names):
                raise ValueError("tasks: each task may appear once (raise its count instead)")
        return self
