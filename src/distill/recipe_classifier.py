"""The classifier family's recipe: data (digits, tensor files, image folders, generated or loaded
graphs), a teacher the run trains once (or loads; optionally an ensemble), a student from the model zoo,
evaluation (torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from distill.configs.base import DISTRIBUTION, HIDDEN_STATES, Strict
from distill.errors import InputError
from distill.paths import resolve_path
from distill.recipe_base import EvalConfigBase, RecipeBase, method_union, register_recipe

if TYPE_CHECKING:
    from distill.configs.base import MethodConfigBase

    MethodConfig = MethodConfigBase
else:
    MethodConfig = method_union("classifier")

GRAPH_KINDS = ("sbm", "graph_files")


class AugmentConfig(Strict):
    """Training-time augmentation, drawn in the method's preparation step (resumes exactly)."""

    crop_padding: int = Field(default=0, ge=0)
    flip: bool = False
    mixup_alpha: float = Field(default=0.0, ge=0)
    cutmix_alpha: float = Field(default=0.0, ge=0)


class _DataBase(Strict):
    label_fraction: float = Field(default=1.0, gt=0, le=1)  # share of training rows whose label is kept
    unlabelled: bool = False  # teacher-supervised methods also train on the rows without labels (SSLD)
    validation_fraction: float = Field(default=0.1, ge=0, lt=1)  # carved from train, for best-on-validation
    batch_size: int = Field(default=64, ge=1)
    split_seed: int = 0  # the test split and the labelled subset; fixed across training seeds
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class DigitsDataConfig(_DataBase):
    """sklearn's 8x8 digits (1,797 images, 10 classes), shipped with scikit-learn."""

    kind: Literal["digits"] = "digits"
    test_fraction: float = Field(default=0.25, gt=0, lt=1)


class TensorDataConfig(_DataBase):
    """A safetensors file with `x`, `y` (and optionally `x_test`, `y_test`)."""

    kind: Literal["tensors"] = "tensors"
    path: str
    test_fraction: float = Field(default=0.25, gt=0, lt=1)


class ImageFolderDataConfig(_DataBase):
    """A folder of class sub-folders of images, or a `datasets` folder with `image` and `label` columns."""

    kind: Literal["images"] = "images"
    path: str
    image_size: int = Field(default=32, ge=4)
    test_fraction: float = Field(default=0.25, gt=0, lt=1)


class SBMDataConfig(_DataBase):
    """A generated stochastic block model: node features plus edges with controlled homophily."""

    kind: Literal["sbm"] = "sbm"
    nodes: int = Field(default=2000, ge=10)
    classes: int = Field(default=5, ge=2)
    features: int = Field(default=32, ge=1)
    avg_degree: float = Field(default=10.0, gt=0)
    homophily: float = Field(default=0.8, ge=0, le=1)
    feature_signal: float = Field(default=1.0, ge=0)
    train_per_class: int = Field(default=20, ge=1)


class GraphFilesDataConfig(_DataBase):
    """A graph from files: an edge list, node features (.npy, .safetensors or CSV), one label per line."""

    kind: Literal["graph_files"] = "graph_files"
    edges: str
    features: str
    labels: str
    train_per_class: int = Field(default=20, ge=1)


ClassifierDataConfig = Annotated[
    DigitsDataConfig | TensorDataConfig | ImageFolderDataConfig | SBMDataConfig | GraphFilesDataConfig,
    Field(discriminator="kind"),
]


class ModelSpecConfig(Strict):
    """A model of the zoo (`mlp`, `cnn`, `resnet`, `vit`, `timm:<name>`; `gcn`, `sage` for graphs)
    with its constructor options."""

    arch: str
    options: dict[str, Any] = Field(default_factory=dict)


class ClassifierTeacherConfig(Strict):
    """The teacher: trained by the run on the labelled training rows (stored by fingerprint, so seeds and
    resumed runs train it once) or loaded from an exported folder (`path`: model.safetensors +
    config.json). `ensemble` > 1 trains that many members with different seeds and averages their
    probabilities (MEAL V2)."""

    kind: Literal["trained"] = "trained"
    model: ModelSpecConfig
    path: str | None = None
    ensemble: int = Field(default=1, ge=1)
    steps: int = Field(default=600, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=5e-4, ge=0)
    full_labels: bool = True  # train the teacher on every training label (False: only data.label_fraction)
    store: str = "runs/.teachers"

    provides: ClassVar[frozenset[str]] = frozenset({DISTRIBUTION, HIDDEN_STATES})


class ClassifierEvalConfig(EvalConfigBase):
    batch_size: int = Field(default=256, ge=1)
    every: int = Field(
        default=0, ge=0
    )  # evaluate on validation every N steps for best-on-validation (0: last only)


@register_recipe
class ClassifierRecipe(RecipeBase):
    """A classifier run: data, teacher, student, method (+ baselines), training, evaluation."""

    family: ClassVar[str] = "classifier"

    data: ClassifierDataConfig
    teacher: ClassifierTeacherConfig | None = None
    student: ModelSpecConfig
    method: MethodConfig
    baselines: list[MethodConfig] = Field(default_factory=list)
    eval: ClassifierEvalConfig = Field(default_factory=ClassifierEvalConfig)

    @model_validator(mode="after")
    def _graph_fits(self) -> ClassifierRecipe:
        graph = self.data.kind in GRAPH_KINDS
        for field, m in zip(self.method_fields(), self.methods(), strict=True):
            if m.name == "vqgraph" and not graph:
                raise ValueError(
                    f"{field}: method 'vqgraph' distils a GNN's structure codes; data.kind must be a graph ({', '.join(GRAPH_KINDS)})"
                )
            if graph and HIDDEN_STATES in m.teacher_needs:
                raise ValueError(
                    f"{field}: method {m.name!r} reads teacher modules through hooks; a graph teacher gives logits only"
                )
        if (
            self.teacher is not None
            and self.teacher.ensemble > 1
            and any(HIDDEN_STATES in m.teacher_needs for m in self.methods())
        ):
            raise ValueError(
                "teacher.ensemble: feature methods need one teacher (whose modules would they read?)"
            )
        if self.teacher is not None and self.teacher.ensemble > 1 and self.teacher.path is not None:
            raise ValueError(
                "teacher.ensemble: a loaded teacher (teacher.path) is one model; drop ensemble or path"
            )
        if self.teacher is not None and (self.teacher.model.arch in ("gcn", "sage")) != graph:
            raise ValueError(
                f"teacher.model.arch: {self.teacher.model.arch!r} does not fit data.kind={self.data.kind!r}"
            )
        if self.student.arch in ("gcn", "sage"):
            raise ValueError(
                "student.arch: the student is a plain classifier (a GNN student would need the graph at inference)"
            )
        return self

    def preflight(self) -> None:
        preflight_data(self.data)
        if (
            self.teacher is not None
            and self.teacher.path is not None
            and not resolve_path(self.teacher.path).is_dir()
        ):
            raise InputError(f"teacher.path: teacher folder not found: {resolve_path(self.teacher.path)}")


def preflight_data(data: _DataBase) -> None:
    """Every file the data section names exists (one line naming the field otherwise)."""
    fields = ("edges", "features", "labels") if isinstance(data, GraphFilesDataConfig) else ("path",)
    for field in fields:
        value = getattr(data, field, None)
        if isinstance(value, str) and not resolve_path(value).exists():
            raise InputError(f"data.{field}: not found: {resolve_path(value)}")
