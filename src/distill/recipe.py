"""The typed recipe: everything a run needs, validated before any model loads.

Imports neither torch nor transformers, so `distill validate` is instant and model-free.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import yaml
from pydantic import Field, ValidationError, model_validator

from distill.configs import METHOD_CONFIGS
from distill.configs.base import MethodConfigBase
from distill.configs.factory import FactoryConfig
from distill.configs.lm import Divergence, LogitKDConfig, SeqKDConfig, SFTConfig, tokenizer_misfit
from distill.configs.lm_sections import (
    CacheConfig,
    DataConfig,
    DataFileConfig,
    EvalConfig,
    GenerateConfig,
    PruneConfig,
    StudentConfig,
)
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
from distill.recipe_base import (
    RECIPES,
    OptimizerConfig,
    RecipeBase,
    TrainConfig,
    method_union,
    recipe_family,
    register_recipe,
)
from distill.recipe_classifier import ClassifierRecipe
from distill.recipe_condense import CondenseRecipe
from distill.recipe_diffusion import DiffusionRecipe
from distill.recipe_embed import EmbedRecipe

if TYPE_CHECKING:
    MethodConfig = MethodConfigBase
else:
    MethodConfig = method_union("lm")

__all__ = [
    "ClassifierRecipe",
    "CondenseRecipe",
    "DiffusionRecipe",
    "EmbedRecipe",
    "CacheConfig",
    "CachedTeacherConfig",
    "DataConfig",
    "DataFileConfig",
    "EvalConfig",
    "GenerateConfig",
    "OptimizerConfig",
    "PruneConfig",
    "StudentConfig",
    "TrainConfig",
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


@register_recipe
class Recipe(RecipeBase):
    """A language-model run: teacher, student, data, method (+ baselines trained the same way), training,
    evaluation, teacher cache."""

    family: ClassVar[str] = "lm"

    teacher: TeacherConfig | None = None
    student: StudentConfig
    data: DataConfig
    method: MethodConfig
    baselines: list[MethodConfig] = Field(default_factory=list)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    factory: FactoryConfig | None = None  # the teacher writes, verifiers filter: the training data

    @model_validator(mode="after")
    def _data_source(self) -> Recipe:
        if self.factory is None and self.data.train is None:
            raise ValueError("data.train: required (or a factory section that makes the training data)")
        if self.factory is not None and self.data.train is not None:
            raise ValueError("data.train: the factory section makes the training data; drop data.train")
        if self.factory is not None and self.data.generate is not None:
            raise ValueError(
                "data.generate: the factory section generates the teacher's answers; drop data.generate"
            )
        if self.factory is not None and self.teacher is None:
            raise ValueError("factory: needs a teacher section (the model that writes the answers)")
        return self

    @model_validator(mode="after")
    def _prune_source(self) -> Recipe:
        if self.student.init == "prune" and local_teacher_source(self.teacher) is None:
            raise ValueError(
                "student.init='prune' prunes the teacher: the teacher section needs local weights"
            )
        for field, m in zip(self.method_fields(), self.methods(), strict=True):
            if self.student.lora is not None and getattr(m, "quantize", None) is not None:
                raise ValueError(
                    f"{field}.quantize: quantizing a LoRA student (QLoRA) is not supported; drop student.lora or the quantize section"
                )
            if self.student.tokenizer is not None and self.data.packing:
                raise ValueError(
                    "data.packing: cross-tokenizer batches pair each row with the teacher's; set packing: false"
                )
            known = self.student.tokenizer is not None or self.student.init != "pretrained"
            misfit = tokenizer_misfit(field, m.name, self.student.tokenizer is not None) if known else None
            if misfit is not None:
                raise ValueError(misfit)
            if getattr(m, "relations", None) is not None and self.data.packing:
                raise ValueError(
                    f"{field}.relations: packed rows hold several texts, and relations would cross them; set data.packing: false"
                )
        return self

    def preflight(self) -> None:
        preflight(self)

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
        if data_file is not None and not probe_path(
            f"{field}.path", resolve_path(data_file.path), Path.exists
        ):
            raise InputError(f"{field}.path: data file not found: {resolve_path(data_file.path)}")
    sources = [(f"teacher.{name}", src) for name, src in teacher_sources(recipe.teacher)]
    for field, m in zip(recipe.method_fields(), recipe.methods(), strict=True):
        reference = getattr(m, "reference", None)
        if isinstance(reference, ModelConfig):
            sources.append((f"{field}.reference", reference))
    if recipe.factory is not None and recipe.factory.prompts is not None:
        prompts = resolve_path(recipe.factory.prompts)
        if not probe_path("factory.prompts", prompts, Path.is_file):
            raise InputError(f"factory.prompts: prompt file not found: {prompts}")
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
    if (
        facts is not None
        and facts.vocab
        and isinstance(recipe.teacher, LiveTeacherConfig | ServedTeacherConfig)
    ):
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


def parse_recipe(data: Any, overrides: list[str] | None = None) -> RecipeBase:
    """Validate a recipe mapping as its family's recipe class (picked from the method's name)."""
    if not isinstance(data, dict):
        raise RecipeError("recipe: the top level must be a mapping")
    for assignment in overrides or []:
        try:
            apply_override(data, assignment)
        except IndexError:
            raise RecipeError(f"override {assignment!r}: the list has no item at that index") from None
    method = data.get("method")
    name = method.get("name") if isinstance(method, dict) else None
    if isinstance(name, str) and name not in METHOD_CONFIGS.names():
        raise RecipeError(
            f"recipe field 'method.name': unknown method {name!r} (known: {', '.join(METHOD_CONFIGS.names())})"
        )
    try:
        recipe = RECIPES.get(recipe_family(data)).model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_error(err)) from None
    _check_templates(recipe)
    return recipe


def _check_templates(recipe: RecipeBase) -> None:
    """`output_dir` and `cache.path` may use `{name}` only; anything else would fail at the end of a run."""
    templates: list[tuple[str, Callable[[], Path]]] = [("output_dir", recipe.run_dir)]
    if isinstance(recipe, Recipe):
        templates.append(("cache.path", recipe.cache_dir))
    for field, method in templates:
        try:
            method()
        except (KeyError, IndexError, AttributeError, ValueError) as err:
            raise RecipeError(
                f"{field}: only {{name}} may appear in braces ({type(err).__name__}: {err})"
            ) from None


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


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> RecipeBase:
    """Read a YAML recipe (a path or a built-in name), apply `--set` overrides, validate."""
    path = resolve_recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}{where}: not valid YAML") from None
    except UnicodeDecodeError as err:
        raise InputError(
            f"recipe {path}: not a UTF-8 text file (byte {err.start} cannot be decoded)"
        ) from None
    except OSError as err:
        raise InputError(f"cannot read recipe {path}: {err.strerror or err}") from None
    return parse_recipe(data, overrides)


def lm_recipe(recipe: RecipeBase, command: str) -> Recipe:
    """The recipe as a language-model recipe, for the commands only that family has (cache, generate)."""
    if not isinstance(recipe, Recipe):
        raise RecipeError(
            f"distill {command} is for language-model recipes; this recipe's method is of the {recipe.family} family"
        )
    return recipe


def dump_recipe(recipe: RecipeBase) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
