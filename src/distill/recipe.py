"""The typed recipe: everything a run needs, validated before any model loads.

Imports neither torch nor transformers, so `distill validate` is instant and model-free.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from distill.configs import METHOD_CONFIGS, Strict
from distill.configs.base import MethodConfigBase
from distill.configs.lm import Divergence, LogitKDConfig, SeqKDConfig, SFTConfig
from distill.configs.teachers import (
    CachedTeacherConfig,
    DType,
    LiveTeacherConfig,
    ModelConfig,
    ServedTeacherConfig,
    TeacherConfig,
)
from distill.errors import InputError, RecipeError
from distill.paths import resolve_path

__all__ = [
    "CachedTeacherConfig",
    "Divergence",
    "DType",
    "LiveTeacherConfig",
    "LogitKDConfig",
    "ModelConfig",
    "SFTConfig",
    "SeqKDConfig",
    "ServedTeacherConfig",
    "TeacherConfig",
]


class PruneConfig(Strict):
    """Depth pruning: keep `keep_layers` evenly spaced layers (first and last included) or an explicit list."""

    keep_layers: int | None = Field(default=None, ge=1)
    layers: list[int] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> PruneConfig:
        if (self.keep_layers is None) == (self.layers is None):
            raise ValueError("set exactly one of keep_layers or layers")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise ValueError("layers must be a non-empty list of distinct indices")
        return self


class StudentConfig(Strict):
    """How the student is made: a depth-pruned copy of the teacher, a fresh model from a config, or a
    pretrained model."""

    init: Literal["prune", "config", "pretrained"] = "prune"
    prune: PruneConfig | None = None
    config: dict[str, Any] | None = None
    model: ModelConfig | None = None

    @model_validator(mode="after")
    def _matching_section(self) -> StudentConfig:
        needed = {"prune": self.prune, "config": self.config, "pretrained": self.model}[self.init]
        if needed is None:
            section = {"prune": "prune", "config": "config", "pretrained": "model"}[self.init]
            raise ValueError(f"init={self.init!r} needs the student.{section} section")
        return self


class DataFileConfig(Strict):
    """A JSONL or Parquet file (or a `datasets` folder saved with save_to_disk) of `prompt`/`completion`
    pairs or chat `messages`."""

    path: str
    limit: int | None = Field(default=None, ge=1)


class GenerateConfig(Strict):
    """Teacher completes every prompt first (sequence-KD data). Answers are stored under `store`, keyed by
    a fingerprint of prompts, teacher and settings, so runs that share them (live, cached or served
    teacher; resumed runs) generate once."""

    store: str = "runs/.generated"
    max_new_tokens: int = Field(default=64, ge=1)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    batch_size: int = Field(default=16, ge=1)


class DataConfig(Strict):
    train: DataFileConfig
    eval: DataFileConfig | None = None
    generate: GenerateConfig | None = None
    system_prompt: str | None = None
    max_length: int = Field(default=512, ge=8)
    batch_size: int = Field(default=8, ge=1)
    packing: bool = False
    group_by_length: bool = True


def _method_union() -> Any:
    """The discriminated union of every registered method config (families register in distill.configs)."""
    classes = tuple(METHOD_CONFIGS.get(n) for n in METHOD_CONFIGS.names())
    return Annotated[Union[classes], Field(discriminator="name")]  # noqa: UP007 - built at run time


if TYPE_CHECKING:
    MethodConfig = MethodConfigBase
else:
    MethodConfig = _method_union()


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


class CacheConfig(Strict):
    """Where and how `distill cache` stores the teacher's top-k (read back with teacher.kind: cache)."""

    path: str = "runs/{name}/teacher-cache"
    k: int = Field(default=64, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    shard_size: int = Field(default=256, ge=1)
    batch_size: int = Field(default=8, ge=1)
    value_step: float = Field(default=0.02, gt=0)  # log-prob quantisation step (in sqrt-p); smaller = exacter, bigger
    zstd_level: int = Field(default=19, ge=1, le=22)


class EvalConfig(Strict):
    batch_size: int = Field(default=8, ge=1)
    before: bool = True
    position_buckets: list[int] = Field(default_factory=lambda: [0, 8, 16, 32, 64, 128, 256])

    @field_validator("position_buckets")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if not v or v[0] != 0 or any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError("must start at 0 and increase strictly")
        return v


class Recipe(Strict):
    """One run: teacher, student, data, method (+ baselines trained the same way), training, evaluation."""

    name: str = "run"
    description: str = ""
    seed: int = 0
    output_dir: str = "runs/{name}"
    teacher: TeacherConfig | None = None
    student: StudentConfig
    data: DataConfig
    method: MethodConfig
    baselines: list[MethodConfig] = Field(default_factory=list)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)

    seeds: list[int] | None = None  # run every method once per seed; the report gives mean and interval

    @model_validator(mode="after")
    def _capabilities(self) -> Recipe:
        methods: list[MethodConfigBase] = [self.method, *self.baselines]
        fields = ["method", *(f"baselines.{i}" for i in range(len(self.baselines)))]
        provides: frozenset[str] = getattr(self.teacher, "provides", frozenset())
        for field, m in zip(fields, methods, strict=True):
            missing = sorted(m.teacher_needs - provides)
            if missing and self.teacher is None:
                raise ValueError(f"{field}: method {m.name!r} needs a teacher section")
            if missing:
                raise ValueError(
                    f"{field}: method {m.name!r} needs the teacher's {', '.join(missing)}, which "
                    f"teacher.kind={self.teacher.kind!r} does not provide"  # type: ignore[union-attr]
                )
            try:
                m.check(self)
            except ValueError as err:
                raise ValueError(f"{field}: {err}") from None
        if self.student.init == "prune" and local_teacher_source(self.teacher) is None:
            raise ValueError("student.init='prune' prunes the teacher: the teacher section needs local weights")
        groups = {g for m in methods for g in m.optimizer_groups}
        unknown = sorted(set(self.train.optimizers) - groups)
        if unknown:
            raise ValueError(f"train.optimizers.{unknown[0]}: no method of this run has that optimizer group ({sorted(groups)})")
        labels = [m.display for m in methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"method and baselines need distinct labels (set `label:`), got {labels}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError("seeds: must be a non-empty list of distinct integers")
        return self

    def run_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.seed]

    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    def cache_dir(self) -> Path:
        return Path(self.cache.path.format(name=self.name))


def teacher_sources(teacher: TeacherConfig | None) -> list[tuple[str, ModelConfig]]:
    """The local model folders a teacher section points at, by field name."""
    if isinstance(teacher, LiveTeacherConfig):
        return [("model", teacher.model)]
    if isinstance(teacher, ServedTeacherConfig | CachedTeacherConfig) and teacher.tokenizer is not None:
        return [("tokenizer", teacher.tokenizer)]
    return []


def local_teacher_source(teacher: TeacherConfig | None) -> ModelConfig | None:
    """Where the teacher's weights and tokenizer live on this machine (a served or cached teacher may
    still point at a local copy, for its tokenizer and for pruning a student from it)."""
    found = teacher_sources(teacher)
    return found[0][1] if found else None


def preflight(recipe: Recipe) -> None:
    """Check every input file and model folder exists, and that the teacher can satisfy the recipe, before
    any model loads (minutes saved on a typo)."""
    for field, data_file in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)):
        if data_file is not None and not probe_path(f"{field}.path", resolve_path(data_file.path), Path.exists):
            raise InputError(f"{field}.path: data file not found: {resolve_path(data_file.path)}")
    sources = [(f"teacher.{name}", src) for name, src in teacher_sources(recipe.teacher)]
    if recipe.student.model is not None:
        sources.append(("student.model", recipe.student.model))
    for field, source in sources:
        folder = resolve_path(source.path)
        if not probe_path(f"{field}.path", folder, Path.is_dir):
            raise InputError(f"{field}.path: model folder not found: {folder}")
        if source.gguf_file and not probe_path(f"{field}.gguf_file", folder / source.gguf_file, Path.is_file):
            raise InputError(f"{field}.gguf_file: GGUF file not found: {folder / source.gguf_file}")
    _check_teacher_facts(recipe)


def probe_path(field: str, path: Path, test: Callable[[Path], bool]) -> bool:
    """Run a file-system test, turning what the OS refuses (a name too long, no permission) into one line."""
    try:
        return test(path)
    except OSError as err:
        raise InputError(f"{field}: cannot use {_shorten(str(path))}: {err.strerror or err}") from None


def _shorten(text: str, limit: int = 160) -> str:
    """A path fit for a one-line message: a 5,000-character name would bury the error itself."""
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]}...{text[-limit // 2 :]} ({len(text)} characters)"


def _check_teacher_facts(recipe: Recipe) -> None:
    """Compare the recipe with the teacher's layer count and vocabulary, read from its files in
    milliseconds; skipped when they cannot be read (loading then reports the problem)."""
    from distill.models.config_facts import check_prune_fits, check_top_k_fits, read_facts

    source = local_teacher_source(recipe.teacher)
    facts = read_facts(resolve_path(source.path), source.gguf_file) if source is not None else None
    prune = recipe.student.prune
    if facts is not None and facts.layers and recipe.student.init == "prune" and prune is not None:
        check_prune_fits(prune.keep_layers, prune.layers, facts.layers)
    if facts is not None and facts.vocab and isinstance(recipe.teacher, LiveTeacherConfig | ServedTeacherConfig):
        check_top_k_fits(recipe.cache.k, facts.vocab)


# ---------------------------------------------------------------- loading, overrides, errors


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-after"))
    msg = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for validator messages
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required field is missing"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"recipe field '{loc}': {msg}{extra}" if loc else f"recipe: {msg}{extra}"


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (so `3`, `true`, `[1,2]`)."""
    if "=" not in assignment:
        raise RecipeError(f"override {assignment!r} must look like key.path=value")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"override {assignment!r} has an empty key")
    node: Any = data
    for part in parts[:-1]:
        if isinstance(node, list) and part.isdigit():
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"override '{key}': '{part}' is not a section")
        node = node.setdefault(part, {})
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(node, list) and parts[-1].isdigit():
        node[int(parts[-1])] = value
    elif isinstance(node, dict):
        node[parts[-1]] = value
    else:
        raise RecipeError(f"override '{key}': parent is not a section")


def parse_recipe(data: Any, overrides: list[str] | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError("recipe: the top level must be a mapping")
    for assignment in overrides or []:
        try:
            apply_override(data, assignment)
        except IndexError:
            raise RecipeError(f"override {assignment!r}: the list has no item at that index") from None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_error(err)) from None
    _check_templates(recipe)
    return recipe


def _check_templates(recipe: Recipe) -> None:
    """`output_dir` and `cache.path` may use `{name}` only; anything else would fail at the end of a run."""
    for field, method in (("output_dir", recipe.run_dir), ("cache.path", recipe.cache_dir)):
        try:
            method()
        except (KeyError, IndexError, AttributeError, ValueError) as err:
            raise RecipeError(f"{field}: only {{name}} may appear in braces ({type(err).__name__}: {err})") from None


def builtin_recipes_dir() -> Path:
    return Path(__file__).parent / "recipes"


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(builtin_recipes_dir().glob("*.yaml"))}


def resolve_recipe_path(name_or_path: str) -> Path:
    """A recipe file, or the built-in recipe of that name; one line if neither can be read."""
    path = Path(name_or_path)
    if probe_path("recipe", path, Path.exists):
        if probe_path("recipe", path, Path.is_dir):
            raise InputError(f"recipe {_shorten(str(path))} is a folder, not a YAML file")
        return path
    builtin = builtin_recipes().get(name_or_path)
    if builtin is not None:
        return builtin
    raise InputError(f"recipe file not found: {_shorten(name_or_path)}")


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (a path or a built-in name), apply `--set` overrides, validate."""
    path = resolve_recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}{where}: not valid YAML") from None
    except UnicodeDecodeError as err:
        raise InputError(f"recipe {path}: not a UTF-8 text file (byte {err.start} cannot be decoded)") from None
    except OSError as err:
        raise InputError(f"cannot read recipe {path}: {err.strerror or err}") from None
    return parse_recipe(data, overrides)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
