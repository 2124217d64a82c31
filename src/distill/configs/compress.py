"""Recipe sections for LLM compression (torch-free): width pruning and its calibration, LoRA students,
fake-quantized students, and the representation-matching method (hidden states, MiniLM relations)."""

from __future__ import annotations

from typing import ClassVar, Literal, TypeVar

from pydantic import Field, field_validator, model_validator

from distill.configs.base import DISTRIBUTION, HIDDEN_STATES, Strict, register_method_config
from distill.configs.lm import LogitKDConfig


class WidthConfig(Strict):
    """Minitron-style width pruning: the student's widths (unset = the teacher's). Heads keep the
    teacher's head width, so `hidden_size` need not be heads x head width."""

    hidden_size: int | None = Field(default=None, ge=1)
    intermediate_size: int | None = Field(default=None, ge=1)
    num_attention_heads: int | None = Field(default=None, ge=1)
    num_key_value_heads: int | None = Field(default=None, ge=1)


class CalibrationConfig(Strict):
    """The texts whose activations rank heads, channels and blocks (default: the first training examples;
    held-out data is never used for a choice)."""

    path: str | None = None  # default: data.train.path
    samples: int = Field(default=64, ge=1)
    batch_size: int = Field(default=8, ge=1)


class LoraConfig(Strict):
    """Train low-rank adapters instead of the student's weights (peft). The LM head is applied fused with the
    loss from its base weight, so it cannot be a target."""

    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    merge: bool = True  # export merged plain weights; false: the base folder plus an `adapter/` folder

    @field_validator("targets")
    @classmethod
    def _not_head(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one module")
        for name in v:
            if name.split(".")[-1] in ("lm_head", "embed_tokens"):
                raise ValueError(
                    f"{name!r}: the LM head and embeddings are applied fused with the loss from their base weights; "
                    "LoRA on them is not supported"
                )
        return v


LayerPairs = list[tuple[int, int]]


class HiddenTermConfig(Strict):
    """Match the outputs of student blocks to teacher blocks. `layers`: `all` (every student block), an
    integer n (n evenly spaced student blocks) or explicit [student, teacher] pairs. Unpaired blocks map to
    the teacher blocks they were pruned from, else to evenly spaced ones."""

    weight: float = Field(default=1.0, ge=0)
    loss: Literal["mse", "cosine", "normalized_mse"] = "normalized_mse"
    layers: Literal["all"] | int | LayerPairs = "all"
    projection: bool | None = None  # None: a learned projection only where the widths differ

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: Literal["all"] | int | LayerPairs) -> Literal["all"] | int | LayerPairs:
        return _check_layers(v)


RelationKind = Literal["attention", "query", "key", "value"]
SELF_RELATIONS: tuple[RelationKind, ...] = ("query", "key", "value")


class RelationTermConfig(Strict):
    """MiniLM / MiniLMv2 relations at chosen blocks: `attention` (query-key, the attention distribution),
    `query`, `key`, `value` self-relations, with `heads` relation heads so head counts may differ."""

    weight: float = Field(default=1.0, ge=0)
    kinds: list[RelationKind] = Field(default_factory=lambda: list(SELF_RELATIONS))
    layers: Literal["all", "last"] | int | LayerPairs = "last"
    heads: int | None = Field(default=None, ge=1)  # None: widths' gcd / 64 (relation heads of >= 64 channels)

    @field_validator("layers")
    @classmethod
    def _layers(
        cls, v: Literal["all", "last"] | int | LayerPairs
    ) -> Literal["all", "last"] | int | LayerPairs:
        return _check_layers(v)

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: list[RelationKind]) -> list[RelationKind]:
        if not v or len(set(v)) != len(v):
            raise ValueError("must be a non-empty list of distinct kinds")
        return v


L = TypeVar("L")


def _check_layers(v: L) -> L:
    if isinstance(v, int) and not isinstance(v, bool) and v < 1:
        raise ValueError("an evenly spaced count must be >= 1")
    if isinstance(v, list):
        if not v:
            raise ValueError("needs at least one [student, teacher] pair")
        if any(s < 0 or t < 0 for s, t in v):
            raise ValueError("layer indices must be >= 0")
        if len({s for s, _ in v}) != len(v):
            raise ValueError("each student layer may appear once")
    return v


@register_method_config
class RepresentationKDConfig(LogitKDConfig):
    """Logit KD plus the teacher's internal representations: block outputs (FitNets / Minitron) and
    self-attention relations (MiniLM, MiniLMv2), each term with its own weight."""

    name: Literal["representation_kd"] = "representation_kd"  # type: ignore[assignment]
    hidden: HiddenTermConfig | None = None
    relations: RelationTermConfig | None = None

    teacher_needs: ClassVar[frozenset[str]] = frozenset({DISTRIBUTION, HIDDEN_STATES})

    @model_validator(mode="after")
    def _some_term(self) -> RepresentationKDConfig:
        if self.hidden is None and self.relations is None:
            raise ValueError("set hidden and/or relations (without them this is logit_kd)")
        return self
