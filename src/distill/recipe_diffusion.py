"""The diffusion family's recipe: data (2-D toys or digits), the teacher (trained by the run through
the same engine, or loaded from a saved diffusers folder), the student's architecture, the method (+
baselines) and the sample-quality evaluation (torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from distill.configs.base import Strict
from distill.errors import InputError
from distill.paths import resolve_path
from distill.recipe_base import EvalConfigBase, RecipeBase, method_union, register_recipe

if TYPE_CHECKING:
    from distill.configs.base import MethodConfigBase

    MethodConfig = MethodConfigBase
else:
    MethodConfig = method_union("diffusion")

TOYS = ("ring8", "moons", "swissroll")


class ToyDataConfig(Strict):
    """A 2-D toy: 8 Gaussians on a ring (mode coverage is measured there), two moons or a swiss roll."""

    kind: Literal["toy"] = "toy"
    shape: Literal["ring8", "moons", "swissroll"] = "ring8"
    train_size: int = Field(default=8192, ge=16)
    test_size: int = Field(default=2048, ge=16)
    batch_size: int = Field(default=512, ge=1)

    @property
    def conditional(self) -> bool:
        return False


class DigitsDiffusionDataConfig(Strict):
    """sklearn's 8x8 digits in [-1, 1], class-conditional, optionally upsampled to 16x16."""

    kind: Literal["digits"] = "digits"
    size: Literal[8, 16] = 8
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    batch_size: int = Field(default=128, ge=1)

    @property
    def conditional(self) -> bool:
        return True


DiffusionDataConfig = Annotated[ToyDataConfig | DigitsDiffusionDataConfig, Field(discriminator="kind")]


class SamplerConfig(Strict):
    kind: Literal["ode", "heun"] = "heun"
    steps: int = Field(default=32, ge=1)


class DiffusionTeacherConfig(Strict):
    """`path`: a folder this family saved (a diffusers model folder plus `noise_path.json`); otherwise
    the run trains one with `denoise` on the training split, stored under `store` by a fingerprint of
    data and these settings, so every method, seed and resumed run reuses it."""

    path: str | None = None
    objective: Literal["flow", "vp", "edm"] = "flow"
    model: dict[str, Any] = Field(default_factory=dict)  # ToyMLP / DigitsUNet options
    steps: int = Field(default=4000, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    ema: float = Field(default=0.999, ge=0, lt=1)
    label_dropout: float = Field(default=0.1, ge=0, lt=1)
    store: str = "runs/.teachers"
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    guidance: float = Field(default=1.0, ge=0)  # CFG scale of conditional sampling and of targets


class DiffusionStudentConfig(Strict):
    """The student's architecture options; empty: the teacher's (needed by `init: teacher`)."""

    model: dict[str, Any] = Field(default_factory=dict)


class DiffusionEvalConfig(EvalConfigBase):
    """`samples` from each student (the same starting noise for every method); the teacher is also
    sampled at every step count of `teacher_steps` (the same-step baselines and the speed-up curve)."""

    before: bool = False
    samples: int = Field(default=2048, ge=16)
    batch_size: int = Field(default=512, ge=1)
    teacher_steps: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    classifier_steps: int = Field(default=600, ge=1)  # the digits feature classifier's training steps

    @model_validator(mode="after")
    def _steps(self) -> DiffusionEvalConfig:
        if not self.teacher_steps or min(self.teacher_steps) < 1:
            raise ValueError("teacher_steps: a non-empty list of step counts >= 1")
        return self


@register_recipe
class DiffusionRecipe(RecipeBase):
    """A diffusion-distillation run: data, teacher, student, method (+ baselines), evaluation."""

    family: ClassVar[str] = "diffusion"

    data: DiffusionDataConfig = Field(default_factory=ToyDataConfig)
    teacher: DiffusionTeacherConfig = Field(default_factory=DiffusionTeacherConfig)
    student: DiffusionStudentConfig = Field(default_factory=DiffusionStudentConfig)
    method: MethodConfig
    baselines: list[MethodConfig] = Field(default_factory=list)
    eval: DiffusionEvalConfig = Field(default_factory=DiffusionEvalConfig)

    @model_validator(mode="after")
    def _student_init(self) -> DiffusionRecipe:
        for field, m in zip(self.method_fields(), self.methods(), strict=True):
            if self.student.model and getattr(m, "init", "scratch") == "teacher":
                raise ValueError(
                    f"{field}.init: 'teacher' copies the teacher's weights, but student.model sets another "
                    "architecture (use init: scratch)"
                )
        return self

    def preflight(self) -> None:
        if self.teacher.path is not None and not resolve_path(self.teacher.path).is_dir():
            raise InputError(f"teacher.path: not a folder: {resolve_path(self.teacher.path)}")
