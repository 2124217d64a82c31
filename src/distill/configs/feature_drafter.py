"""Config of the `feature_drafter` method (torch-free; implementation in methods/lm/feature_drafter.py): an
EAGLE-style one-layer drafter over the target's hidden states, with an optional reduced draft vocabulary."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from distill.configs.base import DISTRIBUTION, HIDDEN_STATES, register_method_config
from distill.configs.lm import DivergenceConfig

if TYPE_CHECKING:
    from distill.recipe_base import RecipeBase


@register_method_config
class FeatureDrafterConfig(DivergenceConfig):
    """A feature-level drafter (EAGLE, Li et al. 2024): one decoder layer reading the target's last hidden
    state and the next token's embedding, trained at every answer position to give the target's next-token
    distribution (`divergence`) and its next hidden state (smooth-L1, `feature_weight`). `draft_vocab: K`
    gives it a K-row head over the K most frequent tokens of the training batches (EAGLE-3); the target's
    distribution is then renormalised over those K ids. Forward KL by default, as EAGLE trains: its dense
    gradient learns fastest, and its optimum (q = p) is also the acceptance optimum; `tvd` (1 - alpha
    exactly) is available."""

    name: Literal["feature_drafter"] = "feature_drafter"
    feature_weight: float = Field(default=1.0, ge=0)
    draft_vocab: int | None = Field(default=None, ge=1)

    # the target's hidden states at every position: only a live teacher has them
    teacher_needs: ClassVar[frozenset[str]] = frozenset({DISTRIBUTION, HIDDEN_STATES})

    def check(self, recipe: RecipeBase) -> None:
        if self.quantize is not None:
            raise ValueError("quantize: a feature drafter is trained and saved in full precision")
        data = getattr(recipe, "data", None)
        if data is not None and data.packing:
            raise ValueError(
                "data.packing: the drafter shifts features by one position within a sequence; set it false"
            )
        evaluation = getattr(recipe, "eval", None)
        if getattr(evaluation, "own_samples", None) is not None:
            raise ValueError(
                "eval.own_samples: a feature drafter cannot write text without its target; measure it with "
                "`distill speculate`"
            )
        student = getattr(recipe, "student", None)
        if student is None:
            return
        if student.lora is not None or student.tokenizer is not None:
            what = "lora" if student.lora is not None else "tokenizer"
            raise ValueError(f"student.{what}: a feature drafter is one full layer over the target's tokens")
        prune = student.prune if student.init == "prune" else None
        if prune is not None:
            if prune.width is not None:
                raise ValueError("student.prune.width: the drafter layer keeps the target's width")
            count = prune.keep_layers if prune.layers is None else len(prune.layers)
            if count != 1:
                where = "keep_layers" if prune.layers is None else "layers"
                raise ValueError(
                    f"student.prune.{where}: a feature drafter is ONE decoder layer (got {count}); "
                    "set keep_layers: 1 or layers: [N]"
                )
