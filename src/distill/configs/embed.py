"""Method configs of the embedding family (sentence encoders and rerankers), torch-free."""

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


@register_method_config
class RerankKDConfig(MethodConfigBase):
    """Reranker distillation by Margin-MSE (Hofstätter et al. 2020): the student scores (query,
    passage) pairs; per query, its score margin between the labelled positive and each negative regresses
    onto the teacher's (the teacher encoder's cosine of query and passage embeddings). `student_kind`:
    `bi` scores by the cosine of the student encoder's embeddings; `cross` reads "[CLS] query [SEP]
    passage [SEP]" with the student encoder and scores its pooled output with a linear head (exported
    with it). Candidates per query: the positive, `negatives` hard negatives drawn each epoch from the
    teacher's `mine_depth` highest-scored other training passages, and `in_batch_negatives` positives
    of the other queries in the batch. `listwise`: KL between teacher and student softmax (at
    `temperature`) over each query's candidates, added to `margin_mse`. The data files hold JSON lines
    {"query", "passage"}."""

    name: Literal["rerank_kd"] = "rerank_kd"
    family: ClassVar[str] = "embed"
    teacher_needs: ClassVar[frozenset[str]] = frozenset({HIDDEN_STATES})

    student_kind: Literal["bi", "cross"] = "cross"
    margin_mse: float = Field(default=1.0, ge=0)
    listwise: float = Field(default=0.0, ge=0)
    temperature: float = Field(default=0.05, gt=0)  # of the listwise softmax (teacher cosines are in [-1, 1])
    negatives: int = Field(default=3, ge=0)
    mine_depth: int = Field(default=10, ge=1)
    in_batch_negatives: int = Field(default=1, ge=0)

    def check(self, recipe: RecipeBase) -> None:
        if self.margin_mse <= 0 and self.listwise <= 0:
            raise ValueError("every loss weight is 0; set margin_mse or listwise")
        if self.negatives + self.in_batch_negatives < 1:
            raise ValueError(
                "negatives: a reranker needs at least 2 candidates per query (the positive and a negative); "
                "set negatives or in_batch_negatives >= 1"
            )
        if self.negatives > self.mine_depth:
            raise ValueError(
                f"negatives: {self.negatives} drawn from the teacher's top {self.mine_depth} (mine_depth)"
            )
        batch = getattr(getattr(recipe, "data", None), "batch_size", None)
        if batch is not None and self.in_batch_negatives > batch - 1:
            raise ValueError(
                f"in_batch_negatives: {self.in_batch_negatives} needs data.batch_size >= {self.in_batch_negatives + 1}"
            )
        others = sorted({m.name for m in recipe.methods() if m.name != self.name})
        if others:
            raise ValueError(
                f"rerank_kd trains on (query, passage) pairs and cannot share a run with {', '.join(others)}"
            )
