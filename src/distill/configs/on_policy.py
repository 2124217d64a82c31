"""Configs of the methods that train on the student's own samples (torch-free; implementations in
methods/lm/on_policy.py): GKD, MiniLLM and DistillSpec's drafter distillation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from distill.configs.base import Strict, register_method_config
from distill.configs.lm import Divergence, LogitKDConfig
from distill.configs.teachers import ModelConfig

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


class ReplayConfig(Strict):
    """DistiLLM's adaptive off-policy schedule (Ko et al. 2024), with student outputs kept and reused.

    A batch uses student outputs with probability `prob`, which starts at `start_prob` (DistiLLM: 0) and
    rises by `increment` (0.1) up to `max_prob` (1.0) each time the loss stops improving; else it is the
    dataset's. Of the student-output batches a share `prob * (1 - step / train.steps)` is sampled fresh
    (and stored, first-in first-out, in a buffer of `buffer_size` rows), the rest drawn from the buffer;
    while the buffer is not yet full every student-output batch is fresh. DistiLLM watches a validation
    loss; a method never sees held-out data, so here the signal is the training loss on the dataset's
    batches (a fixed distribution, as DistiLLM's validation set is), averaged over windows of
    `check_every` steps: a window whose mean per-token loss is not at least `min_improvement` (relative)
    below the previous window's raises `prob`. (DistiLLM raises it when the validation loss rises by
    0.1 over the last level it acted on; a training loss hardly ever rises, so stalling is the trigger.)"""

    buffer_size: int = Field(default=1000, ge=1)  # rows (prompt + completion), DistiLLM's `capacity`
    start_prob: float = Field(default=0.0, ge=0, le=1)
    max_prob: float = Field(default=1.0, ge=0, le=1)
    increment: float = Field(default=0.1, gt=0, le=1)
    check_every: int = Field(default=20, ge=1)
    min_improvement: float = Field(default=0.01, ge=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> ReplayConfig:
        if self.start_prob > self.max_prob:
            raise ValueError(f"start_prob: {self.start_prob} is above max_prob ({self.max_prob})")
        return self


@register_method_config
class OnPolicyConfig(_SampledKDConfig):
    """GKD (Agarwal et al. 2024): with probability `lmbda` a batch's completions are the student's own
    samples, scored by the teacher, else the dataset's; `lmbda: 0` is `logit_kd`. `teacher_mix` samples
    from a teacher/student mixture instead (MiniLLM's mixed sampling). `replay` replaces the fixed
    `lmbda` with DistiLLM's adaptive probability and reuses stored student outputs."""

    name: Literal["on_policy"] = "on_policy"  # type: ignore[assignment]
    divergence: Divergence = "jsd"
    lmbda: float = Field(default=0.5, ge=0, le=1)
    replay: ReplayConfig | None = None

    @property
    def needs_completions(self) -> bool:
        if self.replay is not None:
            return self.replay.start_prob < 1.0 or self.replay.max_prob < 1.0
        return self.lmbda < 1.0

    def check(self, recipe: RecipeBase) -> None:
        super().check(recipe)
        if self.replay is None:
            return
        if "lmbda" in self.model_fields_set:
            raise ValueError(
                "lmbda: with replay the probability of student outputs adapts from replay.start_prob to "
                "replay.max_prob; leave lmbda out"
            )
        data = getattr(recipe, "data", None)
        if data is not None and self.replay.buffer_size < data.batch_size:
            raise ValueError(
                f"replay.buffer_size: {self.replay.buffer_size} rows cannot fill a batch of "
                f"data.batch_size {data.batch_size}"
            )


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
    default.

    `selective` drops that fraction of each batch's tokens from the loss, so a small drafter's capacity
    goes to tokens it can learn. With `reference` (AdaSPEC, Hu et al. 2025: a copy of the drafter already
    distilled from the target, e.g. an earlier drafter run's exported folder, frozen) the per-token loss
    gap L_drafter - L_reference ranks them: the tokens with the largest gap are kept (the reference shows
    they can be fitted) and the rest dropped (even the reference cannot fit them, or the drafter already
    has them). Without a reference the drafter's own divergence ranks them and the largest are dropped.
    Both losses are the method's `divergence` to the target."""

    name: Literal["drafter"] = "drafter"  # type: ignore[assignment]
    divergence: Divergence = "tvd"
    lmbda: float = Field(default=1.0, ge=0, le=1)
    selective: float = Field(default=0.0, ge=0, lt=1)
    reference: ModelConfig | None = None

    def check(self, recipe: RecipeBase) -> None:
        super().check(recipe)
        if self.reference is not None and self.selective == 0:
            raise ValueError("reference: it only ranks tokens for `selective`; set selective > 0 or drop it")
