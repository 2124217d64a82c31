"""Configs of the methods that train on the student's own samples (torch-free; implementations in
methods/lm/on_policy.py): GKD, MiniLLM and DistillSpec's drafter distillation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from distill.configs.base import Strict, register_method_config
from distill.configs.lm import Divergence, LogitKDConfig

if TYPE_CHECKING:
    from distill.recipe_base import RecipeBase


class StudentSamplingConfig(Strict):
    """How the student writes its completions of the batch's prompts."""

    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=1.0, ge=0)  # 0: greedy
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # 0: no top-k cut


class _SampledKDConfig(LogitKDConfig):
    """What every method that learns on its own samples shares."""

    sample: StudentSamplingConfig = Field(default_factory=StudentSamplingConfig)
    teacher_mix: float = Field(default=0.0, ge=0, le=1)

    @property
    def needs_completions(self) -> bool:
        return float(getattr(self, "lmbda", 1.0)) < 1.0

    def check(self, recipe: RecipeBase) -> None:
        teacher = getattr(recipe, "teacher", None)
        if teacher is not None and teacher.kind == "cache":
            raise ValueError(
                f"teacher.kind: a cached teacher holds scores of fixed text and cannot score the student's "
                f"new samples; {self.name} needs teacher.kind 'live' or 'served'"
            )
        if self.teacher_mix > 0 and teacher is not None and teacher.kind != "live":
            raise ValueError(
                "teacher_mix: mixing the teacher into sampling runs the teacher beside the student at every "
                f"token, which needs teacher.kind 'live' (not {teacher.kind!r})"
            )
        data = getattr(recipe, "data", None)
        if data is not None and data.packing:
            raise ValueError(
                f"data.packing: {self.name} rewrites each row with the student's own completion; set it false"
            )


@register_method_config
class OnPolicyConfig(_SampledKDConfig):
    """GKD (Agarwal et al. 2024): with probability `lmbda` a batch's completions are the student's own
    samples, scored by the teacher, else the dataset's; `lmbda: 0` is `logit_kd`. `teacher_mix` samples
    from a teacher/student mixture instead (MiniLLM's mixed sampling)."""

    name: Literal["on_policy"] = "on_policy"  # type: ignore[assignment]
    divergence: Divergence = "jsd"
    lmbda: float = Field(default=0.5, ge=0, le=1)


@register_method_config
class MiniLLMConfig(_SampledKDConfig):
    """MiniLLM (Gu et al. 2024): reverse KL by policy gradient on the student's samples. Per token, the
    exact reverse KL of the next-token distribution (the single-step term) plus the length-normalised sum
    of the future tokens' log-ratio rewards as a REINFORCE term; with `teacher_mix` the samples come from
    the mixture and each token is importance-weighted by student / mixture probability (clipped)."""

    name: Literal["minillm"] = "minillm"  # type: ignore[assignment]
    divergence: Literal["reverse_kl"] = "reverse_kl"
    teacher_mix: float = Field(default=0.2, ge=0, le=1)
    pg_weight: float = Field(default=1.0, ge=0)
    length_normalize: bool = True
    weight_clip: float = Field(default=3.0, gt=0)

    def check(self, recipe: RecipeBase) -> None:
        super().check(recipe)
        s = self.sample
        if s.temperature != 1.0 or s.top_p != 1.0 or s.top_k != 0:
            raise ValueError(
                "sample: the policy gradient is for samples of the student's own distribution; keep "
                "temperature 1, top_p 1 and top_k 0 (use teacher_mix to steer sampling)"
            )


@register_method_config
class DrafterConfig(_SampledKDConfig):
    """DistillSpec (Zhou et al. 2024): a drafter distilled on its own samples (`lmbda` 1) to raise the
    acceptance rate of speculative decoding, which is 1 - TVD(target, drafter) per token; hence TVD by
    default. `selective` (AdaSPEC, 2025): drop from the loss the fraction of tokens whose divergence is
    largest, the ones a small drafter cannot learn, so its capacity goes to tokens it can."""

    name: Literal["drafter"] = "drafter"  # type: ignore[assignment]
    divergence: Divergence = "tvd"
    lmbda: float = Field(default=1.0, ge=0, le=1)
    selective: float = Field(default=0.0, ge=0, lt=1)
