"""Method configs of the diffusion family (torch-free). `steps` is the student's sampling step count:
what it is distilled for and evaluated at; the teacher's reference sampler is set in `teacher.sampler`."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from distill.configs.base import MethodConfigBase, register_method_config

if TYPE_CHECKING:
    from distill.recipe_base import RecipeBase


class DiffusionMethodConfig(MethodConfigBase):
    family: ClassVar[str] = "diffusion"
    sampler: ClassVar[str] = "ode"  # how the student samples: ode | consistency

    steps: int = Field(default=1, ge=1)
    init: Literal["teacher", "scratch"] = "teacher"
    ema: float | None = Field(default=None, ge=0, lt=1)  # EMA decay of the evaluated / exported student


@register_method_config
class DenoiseConfig(DiffusionMethodConfig):
    """Denoising score matching on the data (how teachers are trained; from scratch, the baseline of
    a student architecture). `label_dropout`: the fraction of labels replaced by the null label (CFG)."""

    name: Literal["denoise"] = "denoise"
    steps: int = Field(default=32, ge=1)
    init: Literal["teacher", "scratch"] = "scratch"
    ema: float | None = Field(default=0.999, ge=0, lt=1)
    label_dropout: float = Field(default=0.1, ge=0, lt=1)


@register_method_config
class ProgressiveConfig(DiffusionMethodConfig):
    """Progressive distillation (Salimans & Ho 2022): rounds that halve the step count from
    `start_steps`; each round's student matches two DDIM steps of the previous round's model with one."""

    name: Literal["progressive"] = "progressive"
    start_steps: int = Field(default=32, ge=2)

    @model_validator(mode="after")
    def _halvings(self) -> ProgressiveConfig:
        ratio = self.start_steps // self.steps
        if self.start_steps % self.steps or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(
                f"start_steps: {self.start_steps} must be the student's steps ({self.steps}) times a power of two"
            )
        return self

    @property
    def rounds(self) -> int:
        return (self.start_steps // self.steps).bit_length() - 1


@register_method_config
class ConsistencyConfig(DiffusionMethodConfig):
    """Consistency distillation (Song et al. 2023): f(x_{t_{n+1}}) matches an EMA target's f at the
    teacher's one-step ODE solution x_{t_n}, on a grid of `discretization` steps; `f` is the identity at
    t = 0 by the parameterisation. Samples with the multistep consistency sampler."""

    name: Literal["consistency"] = "consistency"
    sampler: ClassVar[str] = "consistency"
    discretization: int = Field(default=18, ge=2)
    target_ema: float = Field(default=0.95, ge=0, lt=1)
    solver: Literal["euler", "heun"] = "heun"
    distance: Literal["l2", "pseudo_huber"] = "pseudo_huber"
    ema: float | None = Field(default=0.999, ge=0, lt=1)

    @model_validator(mode="after")
    def _grid(self) -> ConsistencyConfig:
        if self.steps > self.discretization:
            raise ValueError(
                f"steps: {self.steps} exceeds the discretization ({self.discretization}) it is trained on"
            )
        return self


@register_method_config
class ReflowConfig(DiffusionMethodConfig):
    """Rectified-flow reflow distillation (Liu et al. 2023): the teacher's ODE couples noise to samples
    (`teacher_steps` steps, fresh pairs each batch); the student regresses the straight line between them."""

    name: Literal["reflow"] = "reflow"
    teacher_steps: int = Field(default=16, ge=1)


class _ScoreDistillConfig(DiffusionMethodConfig):
    """One-step (or few-step) generators trained against the teacher's score and a fake score network
    fitted online to the generator's samples, `critic_updates` critic updates per generator update."""

    optimizer_groups: ClassVar[tuple[str, ...]] = ("generator", "critic")
    critic_updates: int = Field(default=1, ge=1)
    t_min: float = Field(default=0.02, gt=0, lt=1)
    t_max: float = Field(default=0.98, gt=0, le=1)
    backward_simulation: bool = True  # multi-step: train on the generator's own intermediate inputs

    @model_validator(mode="after")
    def _range(self) -> _ScoreDistillConfig:
        if self.t_min >= self.t_max:
            raise ValueError(f"t_min: {self.t_min} must be below t_max ({self.t_max})")
        return self


@register_method_config
class DMD2Config(_ScoreDistillConfig):
    """DMD2 (Yin et al. 2024): distribution-matching gradient (fake minus real x0, normalised); optional
    DMD1 regression to teacher ODE pairs and a GAN head on the critic's features against real data."""

    name: Literal["dmd2"] = "dmd2"
    sampler: ClassVar[str] = "consistency"
    critic_updates: int = Field(default=5, ge=1)
    regression: float = Field(default=0.0, ge=0)
    gan_weight: float = Field(default=0.0, ge=0)


@register_method_config
class VSDConfig(_ScoreDistillConfig):
    """Variational score distillation as SwiftBrush uses it: the generator follows the eps-space
    difference of teacher and fake score (SDS weighting), the fake score is fine-tuned on its samples."""

    name: Literal["vsd"] = "vsd"
    sampler: ClassVar[str] = "consistency"


@register_method_config
class SiDConfig(_ScoreDistillConfig):
    """Score identity distillation (Zhou et al. 2024): the generator loss built from the score identity
    with the (1 - alpha) mix of the two terms (alpha 1.2 in the paper)."""

    name: Literal["sid"] = "sid"
    sampler: ClassVar[str] = "consistency"
    alpha: float = Field(default=1.2, ge=0)


@register_method_config
class GuidanceDistillConfig(DiffusionMethodConfig):
    """Classifier-free-guidance distillation (Meng et al. 2023, stage one): one conditional pass with
    the guidance scale as an input reproduces the teacher's two guided passes, for scales in
    `scale_range`; evaluated at `eval_scale` with `steps` ODE steps."""

    name: Literal["cfg_distill"] = "cfg_distill"
    steps: int = Field(default=8, ge=1)
    scale_range: tuple[float, float] = (1.0, 4.0)
    eval_scale: float = Field(default=2.0, ge=0)

    def check(self, recipe: RecipeBase) -> None:
        if not getattr(getattr(recipe, "data", None), "conditional", False):
            raise ValueError("method 'cfg_distill' needs class-conditional data (data.kind: digits)")
