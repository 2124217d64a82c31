"""The dataset-distillation family's recipe: the real data (as the classifier family reads it), the
synthetic set's budget, the network the matching runs through, an optional teacher (soft labels,
SRe²L), and the evaluation protocol (torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, ClassVar

from pydantic import Field, model_validator

from distill.configs.base import Strict
from distill.recipe_base import EvalConfigBase, RecipeBase, method_union, register_recipe
from distill.recipe_classifier import (
    ClassifierTeacherConfig,
    DigitsDataConfig,
    ImageFolderDataConfig,
    ModelSpecConfig,
    TensorDataConfig,
    preflight_data,
)

if TYPE_CHECKING:
    from distill.configs.base import MethodConfigBase

    MethodConfig = MethodConfigBase
else:
    MethodConfig = method_union("condense")

ZOO = ("mlp", "cnn", "resnet", "vit")

CondenseDataConfig = Annotated[
    DigitsDataConfig | TensorDataConfig | ImageFolderDataConfig, Field(discriminator="kind")
]


class SyntheticConfig(Strict):
    """The distilled set: `ipc` examples per class; the learning rate of its images (and soft labels)."""

    ipc: int = Field(default=10, ge=1)
    image_lr: float = Field(default=0.1, gt=0)
    label_lr: float = Field(default=0.01, gt=0)
    lr_lr: float = Field(default=1e-5, gt=0)  # MTT's learned synthetic step size


class CondenseEvalConfig(EvalConfigBase):
    """Fresh randomly initialised networks trained on the distilled set only, `seeds` of them per
    architecture, for a fixed number of `epochs`; the test split is scored once per network. `archs` beyond the
    first give the cross-architecture numbers. `soft_labels`: also train with the teacher's soft labels
    (and the random-subset control with them), for DD-Ranking's IOR / HLR."""

    before: bool = False
    archs: list[ModelSpecConfig] = Field(
        default_factory=lambda: [ModelSpecConfig(arch="cnn", options={"width": 32})]
    )
    seeds: int = Field(default=5, ge=1)
    epochs: int = Field(default=300, ge=1)
    lr: float = Field(default=1e-3, gt=0)  # Adam; divided by 10 half-way
    batch_size: int = Field(default=256, ge=1)
    soft_labels: bool = False
    full_epochs: int = Field(default=30, ge=1)  # the full-data control: many more rows per epoch


@register_recipe
class CondenseRecipe(RecipeBase):
    """A dataset-distillation run: real data, budget, matching network, method (+ baselines), evaluation."""

    family: ClassVar[str] = "condense"

    data: CondenseDataConfig
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    network: ModelSpecConfig = Field(
        default_factory=lambda: ModelSpecConfig(arch="cnn", options={"width": 32})
    )
    teacher: ClassifierTeacherConfig | None = None
    method: MethodConfig
    baselines: list[MethodConfig] = Field(default_factory=list)
    eval: CondenseEvalConfig = Field(default_factory=CondenseEvalConfig)

    @model_validator(mode="after")
    def _fits(self) -> CondenseRecipe:
        for i, spec in enumerate(self.eval.archs):
            if spec.arch not in ZOO and not spec.arch.startswith("timm:"):
                raise ValueError(
                    f"eval.archs.{i}.arch: {spec.arch!r} is not in the zoo (known: {', '.join(ZOO)}, timm:<name>)"
                )
        if self.network.arch not in ZOO:
            raise ValueError(
                f"network.arch: {self.network.arch!r} is not in the zoo (known: {', '.join(ZOO)})"
            )
        for field, m in zip(self.method_fields(), self.methods(), strict=True):
            if m.name == "sre2l" and self.teacher is None:
                raise ValueError(f"{field}: method 'sre2l' inverts a trained teacher: add a teacher section")
        if self.eval.soft_labels and self.teacher is None:
            raise ValueError("eval.soft_labels: soft labels come from a teacher: add a teacher section")
        return self

    def preflight(self) -> None:
        preflight_data(self.data)
