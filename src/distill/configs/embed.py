"""Method configs of the embedding family (sentence encoders), torch-free."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from distill.configs.base import HIDDEN_STATES, MethodConfigBase, register_method_config

if TYPE_CHECKING:
    from distill.recipe_base import RecipeBase

LOSS_WEIGHTS = ("mse", "cosine", "similarity", "similarity_mse", "relations")


@register_method_config
class EmbedKDConfig(MethodConfigBase):
    """Sentence-embedding distillation: a weighted sum of embedding MSE and cosine (through a learned
    projection when the widths differ), in-batch similarity-matrix KL or MSE (no projection needed), and
    MiniLMv2 query/key/value self-relations at the last layer (`relation_heads` split both widths, so
    head counts may differ). `matryoshka_dims`: every loss is also applied to these leading prefixes of
    the student's embedding, against the teacher's full embedding for the similarity losses."""

    name: Literal["embed_kd"] = "embed_kd"
    family: ClassVar[str] = "embed"
    teacher_needs: ClassVar[frozenset[str]] = frozenset({HIDDEN_STATES})

    mse: float = Field(default=1.0, ge=0)
    cosine: float = Field(default=0.0, ge=0)
    similarity: float = Field(default=0.0, ge=0)
    similarity_mse: float = Field(default=0.0, ge=0)
    relations: float = Field(default=0.0, ge=0)
    temperature: float = Field(default=0.05, gt=0)  # of the in-batch similarity softmax
    relation_heads: int = Field(default=12, ge=1)
    projection: bool = False  # a linear map student -> teacher width for mse / cosine (dropped at export)
    matryoshka_dims: list[int] = Field(default_factory=list)

    def check(self, recipe: RecipeBase) -> None:
        if not any(getattr(self, w) > 0 for w in LOSS_WEIGHTS):
            raise ValueError(f"every loss weight is 0; set one of {', '.join(LOSS_WEIGHTS)}")
        if any(d < 1 for d in self.matryoshka_dims):
            raise ValueError("matryoshka_dims: dimensions must be >= 1")
