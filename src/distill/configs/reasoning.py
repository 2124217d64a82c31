"""Configs of the methods that learn reasoning from the data factory's verified teacher text (torch-free;
implementations in methods/lm/pairwise.py, step_by_step.py, trace_sft.py). None needs a live teacher:
the factory already wrote, verified and filtered the teacher's answers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from distill.configs.base import register_method_config
from distill.configs.lm import LMMethodConfig

if TYPE_CHECKING:
    from distill.recipe_base import RecipeBase


class _FactoryMethodConfig(LMMethodConfig):
    """What every method trained on the factory's output shares."""

    @property
    def data_view(self) -> str:
        """Which view of the factory's data the family builds the training stream from."""
        raise NotImplementedError

    @property
    def eval_prefix(self) -> str:
        """Prepended to the user message at evaluation, as in training (empty: the prompt as is)."""
        return ""

    @property
    def paired(self) -> bool:
        """Whether batches hold pairs (rows [0, B) and [B, 2B)), which packing would break."""
        return False

    def check(self, recipe: RecipeBase) -> None:
        if getattr(recipe, "factory", None) is None:
            raise ValueError(
                f"method {self.name!r} needs a `factory` section: it trains on the factory's verified teacher text"
            )
        data = getattr(recipe, "data", None)
        if self.paired and data is not None and getattr(data, "packing", False):
            raise ValueError(
                f"data.packing: {self.name} batches hold pairs of answers row by row; set packing: false"
            )


@register_method_config
class PairwiseConfig(_FactoryMethodConfig):
    """Learn from a verified (chosen) and a failed (rejected) teacher answer to one prompt. `redi`
    (REDI, Xu et al. 2025): raise the chosen's per-token log-probability and lower the rejected's with
    the smaller weight `alpha`, no reference model. `dpo` (Rafailov et al. 2023): the log-ratio to a
    frozen copy of the initial student, summed over tokens, scaled by `beta`. `sft_weight` adds the
    chosen's per-token NLL (often used with DPO, which alone may lower both answers)."""

    name: Literal["pairwise"] = "pairwise"
    objective: Literal["redi", "dpo"] = "redi"
    beta: float = Field(default=0.1, gt=0)
    alpha: float = Field(default=0.8, ge=0, le=1)
    length_normalize: bool = True  # REDI only; DPO compares summed log-ratios
    sft_weight: float = Field(default=0.0, ge=0)

    @property
    def data_view(self) -> str:
        return "pairs"

    @property
    def paired(self) -> bool:
        return True


@register_method_config
class StepByStepConfig(_FactoryMethodConfig):
    """Distilling Step-by-Step (Hsieh et al. 2023): the teacher's verified answer split into its
    rationale and its final answer, learnt as two tasks told apart by a prefix on the user message:
    `label_prefix` -> `Answer: <answer>`, `rationale_prefix` -> the rationale. Each task's loss is the
    mean token NLL of each row, summed over rows; at evaluation the student answers the label task."""

    name: Literal["step_by_step"] = "step_by_step"
    rationale_weight: float = Field(default=1.0, ge=0)
    label_prefix: str = "[answer] "
    rationale_prefix: str = "[rationale] "

    @model_validator(mode="after")
    def _distinct_prefixes(self) -> StepByStepConfig:
        if self.label_prefix == self.rationale_prefix:
            raise ValueError(
                "rationale_prefix: must differ from label_prefix, which tells the two tasks apart"
            )
        return self

    @property
    def data_view(self) -> str:
        return "step_by_step"

    @property
    def eval_prefix(self) -> str:
        return self.label_prefix

    @property
    def paired(self) -> bool:
        return True


@register_method_config
class TraceSFTConfig(_FactoryMethodConfig):
    """Cross-entropy on the teacher's reasoning traces: the `verified` ones (rejection sampling), all of
    them (`unfiltered`, the baseline verification must beat), or the `shortest` verified trace per prompt.
    `chunked` (Skip-Thinking, 2025): each trace cut into at most `max_chunks` chunks by line or sentence,
    chunk k learnt as its own example given the prompt and chunks before it."""

    name: Literal["trace_sft"] = "trace_sft"
    traces: Literal["verified", "unfiltered", "shortest"] = "verified"
    chunked: bool = False
    chunk_by: Literal["line", "sentence"] = "line"
    max_chunks: int = Field(default=8, ge=1)

    @property
    def data_view(self) -> str:
        return self.traces
