"""What every family's recipe shares: name, seeds, output folder, training and the method list.

Each family (language models, classifiers, ...) subclasses `RecipeBase` with its own teacher / student /
data / eval sections and a `method` union of its own method configs, and registers it; `parse_recipe`
picks the class from the method's family, so a classifier recipe is validated as one and its errors name
its fields. Torch-free, like every recipe module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from pydantic import Field, model_validator

from distill.configs.base import METHOD_CONFIGS, MethodConfigBase, Strict
from distill.registry import Registry


class OptimizerConfig(Strict):
    """Per-group optimizer settings (`train.optimizers.<group>`); unset fields take the train.* values."""

    lr: float | None = Field(default=None, gt=0)
    weight_decay: float | None = Field(default=None, ge=0)
    betas: tuple[float, float] | None = None
    max_grad_norm: float | None = Field(default=None, gt=0)


class TrainConfig(Strict):
    steps: int = Field(default=100, ge=1)
    lr: float = Field(default=5e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_accum: int = Field(default=1, ge=1)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every: int = Field(default=0, ge=0)
    chunk_size: int = Field(default=1024, ge=1)
    threads: int | None = Field(default=None, ge=1)
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    deterministic: bool = True
    optimizers: dict[str, OptimizerConfig] = Field(default_factory=dict)


class EvalConfigBase(Strict):
    batch_size: int = Field(default=8, ge=1)
    before: bool = True  # evaluate the untrained student too


def method_union(family: str) -> Any:
    """The discriminated union of the registered method configs of one family."""
    classes = tuple(
        METHOD_CONFIGS.get(n) for n in METHOD_CONFIGS.names() if METHOD_CONFIGS.get(n).family == family
    )
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[classes], Field(discriminator="name")]  # noqa: UP007 - built at run time


class RecipeBase(Strict):
    """One run: a method (+ baselines trained the same way) on one family's teacher, student and data."""

    family: ClassVar[str] = "abstract"

    name: str = "run"
    description: str = ""
    seed: int = 0
    output_dir: str = "runs/{name}"
    train: TrainConfig = Field(default_factory=TrainConfig)
    seeds: list[int] | None = None  # run every method once per seed; the report gives mean and interval

    if TYPE_CHECKING:  # each family declares these with its own method union and eval section
        method: MethodConfigBase
        baselines: list[MethodConfigBase]
        eval: EvalConfigBase

    @model_validator(mode="after")
    def _common(self) -> RecipeBase:
        methods = self.methods()
        teacher = getattr(self, "teacher", None)
        provides: frozenset[str] = getattr(teacher, "provides", frozenset())
        for field, m in zip(self.method_fields(), methods, strict=True):
            missing = sorted(m.teacher_needs - provides)
            if missing and teacher is None:
                raise ValueError(f"{field}: method {m.name!r} needs a teacher section")
            if missing:
                kind = getattr(teacher, "kind", type(teacher).__name__)
                raise ValueError(
                    f"{field}: method {m.name!r} needs the teacher's {', '.join(missing)}, which teacher.kind={kind!r} does not provide"
                )
            try:
                m.check(self)
            except ValueError as err:
                raise ValueError(f"{field}: {err}") from None
        groups = {g for m in methods for g in m.optimizer_groups}
        unknown = sorted(set(self.train.optimizers) - groups)
        if unknown:
            raise ValueError(
                f"train.optimizers.{unknown[0]}: no method of this run has that optimizer group ({sorted(groups)})"
            )
        labels = [m.display for m in methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"method and baselines need distinct labels (set `label:`), got {labels}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError("seeds: must be a non-empty list of distinct integers")
        return self

    def methods(self) -> list[MethodConfigBase]:
        return [self.method, *self.baselines]

    def method_fields(self) -> list[str]:
        return ["method", *(f"baselines.{i}" for i in range(len(self.baselines)))]

    def run_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.seed]

    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    def preflight(self) -> None:
        """Check input files and folders exist before anything loads (one line naming the field)."""


RECIPES: Registry[type[RecipeBase]] = Registry("recipe family")


def register_recipe(cls: Any) -> Any:
    RECIPES.register(cls.family)(cls)
    return cls


def recipe_family(data: dict[str, Any]) -> str:
    """The family of a recipe mapping, from its method's name (the language-model family by default)."""
    method = data.get("method")
    name = method.get("name") if isinstance(method, dict) else None
    if isinstance(name, str) and name in METHOD_CONFIGS.names():
        return METHOD_CONFIGS.get(name).family
    return "lm"
