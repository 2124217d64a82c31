"""The language-model family's recipe sections: how the student is made, the data files, teacher
generation, the teacher cache and held-out evaluation (torch-free)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from distill.configs.base import Strict
from distill.configs.compress import CalibrationConfig, LoraConfig, WidthConfig
from distill.configs.teachers import ModelConfig
from distill.recipe_base import EvalConfigBase


class PruneConfig(Strict):
    """Pruning the teacher into the student. Depth: keep `keep_layers` blocks, evenly spaced (first and last
    included) or the most important by `depth` ranking, or an explicit `layers` list. Width (Minitron):
    heads, MLP channels and embedding channels ranked by their activations on `calibration` texts
    (`ranking: random` is the control)."""

    keep_layers: int | None = Field(default=None, ge=1)
    layers: list[int] | None = None
    depth: Literal["even", "importance"] = "even"
    width: WidthConfig | None = None
    ranking: Literal["importance", "random"] = "importance"
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)

    @model_validator(mode="after")
    def _one_of(self) -> PruneConfig:
        if self.keep_layers is not None and self.layers is not None:
            raise ValueError("set keep_layers or layers, not both")
        if self.keep_layers is None and self.layers is None and self.width is None:
            raise ValueError("set keep_layers, layers or width")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise ValueError("layers must be a non-empty list of distinct indices")
        if self.depth == "importance" and self.keep_layers is None:
            raise ValueError(
                "depth: 'importance' ranks blocks to keep `keep_layers` of them; set keep_layers"
            )
        return self

    def calibrated(self) -> bool:
        """Whether building the student needs activations of calibration texts."""
        return self.ranking == "importance" and (self.width is not None or self.depth == "importance")


class StudentTokenizerConfig(Strict):
    """A student tokenizer other than the teacher's (cross-tokenizer distillation): a tokenizer folder
    (`path`), or a byte-level BPE of `vocab_size` entries trained on the training text (the teacher's
    answers included) and saved with the student. A pruned or config-built student then gets embedding rows
    for the new vocabulary: with `transplant`, each new token's row is the mean of the teacher rows of the
    teacher tokens its text splits into; without, fresh random rows."""

    path: ModelConfig | None = None
    vocab_size: int | None = Field(default=None, ge=1)
    transplant: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> StudentTokenizerConfig:
        if (self.path is None) == (self.vocab_size is None):
            raise ValueError("give exactly one of path (a tokenizer folder) and vocab_size (train a BPE)")
        return self


class StudentConfig(Strict):
    """How the student is made: a depth-pruned copy of the teacher, a fresh model from a config, or a
    pretrained model."""

    init: Literal["prune", "config", "pretrained"] = "prune"
    prune: PruneConfig | None = None
    config: dict[str, Any] | None = None
    model: ModelConfig | None = None
    lora: LoraConfig | None = None
    tokenizer: StudentTokenizerConfig | None = None  # differs from the teacher's: cross-tokenizer KD

    @model_validator(mode="after")
    def _matching_section(self) -> StudentConfig:
        needed = {"prune": self.prune, "config": self.config, "pretrained": self.model}[self.init]
        if needed is None:
            section = {"prune": "prune", "config": "config", "pretrained": "model"}[self.init]
            raise ValueError(f"init={self.init!r} needs the student.{section} section")
        if self.init == "pretrained" and self.tokenizer is not None:
            raise ValueError(
                "student.tokenizer: a pretrained student brings its own tokenizer; drop this section"
            )
        return self


class DataFileConfig(Strict):
    """A JSONL or Parquet file (or a `datasets` folder saved with save_to_disk) of `prompt`/`completion`
    pairs or chat `messages`."""

    path: str
    limit: int | None = Field(default=None, ge=1)


class GenerateConfig(Strict):
    """Teacher completes every prompt first (sequence-KD data). Answers are stored under `store`, keyed by
    a fingerprint of prompts, teacher and settings, so runs that share them (live, cached or served
    teacher; resumed runs) generate once."""

    store: str = "runs/.generated"
    max_new_tokens: int = Field(default=64, ge=1)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    batch_size: int = Field(default=16, ge=1)


class DataConfig(Strict):
    train: DataFileConfig | None = None  # required, unless a `factory` section makes the training data
    eval: DataFileConfig | None = None
    generate: GenerateConfig | None = None
    system_prompt: str | None = None
    max_length: int = Field(default=512, ge=8)
    batch_size: int = Field(default=8, ge=1)
    packing: bool = False
    group_by_length: bool = True


class CacheConfig(Strict):
    """Where and how `distill cache` stores the teacher's top-k (read back with teacher.kind: cache)."""

    path: str = "runs/{name}/teacher-cache"
    k: int = Field(default=64, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    shard_size: int = Field(default=256, ge=1)
    batch_size: int = Field(default=8, ge=1)
    value_step: float = Field(
        default=0.02, gt=0
    )  # log-prob quantisation step (in sqrt-p); smaller = exacter, bigger
    zstd_level: int = Field(default=19, ge=1, le=22)


class OwnSamplesEvalConfig(Strict):
    """Also measure KL(teacher‖student) on answers the student writes itself to the held-out prompts:
    the distribution it meets at inference, where exposure bias shows (GKD's measure). Samples are drawn
    with a generator seeded by `seed`, so every student is scored on its own answers the same way."""

    max_new_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=1.0, ge=0)  # 0: greedy
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = 0


class EvalConfig(EvalConfigBase):
    position_buckets: list[int] = Field(default_factory=lambda: [0, 8, 16, 32, 64, 128, 256])
    own_samples: OwnSamplesEvalConfig | None = None

    @field_validator("position_buckets")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if not v or v[0] != 0 or any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError("must start at 0 and increase strictly")
        return v
