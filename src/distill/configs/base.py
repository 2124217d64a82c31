"""What every recipe section shares, and the torch-free registry method configs register in.

The recipe's `method` union is built from this registry, so a family adds a method by registering a
config class here (and its implementation in `methods/`) without editing the recipe module. Each
config declares what it needs of the teacher; each teacher kind declares what it provides; validation
compares the two and names the field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from distill.registry import Registry

if TYPE_CHECKING:
    from distill.recipe_base import RecipeBase

# What a teacher signal can be (teacher kinds list what they provide, methods what they need):
DISTRIBUTION = "distribution"  # next-token distribution at given positions, dense or top-k
DENSE_LOGITS = "dense_logits"  # the full-vocabulary logits (a live model)
HIDDEN_STATES = "hidden_states"  # intermediate activations (a live model)
GENERATION = "generation"  # the teacher writes text (a live model or a server)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodConfigBase(Strict):
    """Fields every method has. `label` names a variant, so one method can appear several times in a
    run with other settings (forward KL vs JSD)."""

    name: str
    label: str | None = None

    teacher_needs: ClassVar[frozenset[str]] = frozenset()
    family: ClassVar[str] = "lm"
    optimizer_groups: ClassVar[tuple[str, ...]] = ("main",)  # the groups its Method declares

    @property
    def display(self) -> str:
        return self.label or self.name

    def check(self, recipe: RecipeBase) -> None:  # noqa: B027 - optional hook
        """Raise ValueError naming the field when this method cannot run in `recipe`."""


METHOD_CONFIGS: Registry[type[MethodConfigBase]] = Registry("method")


def register_method_config(cls: Any) -> Any:
    """Class decorator: register a method config under its `name` literal's value."""
    name = cls.model_fields["name"].default
    METHOD_CONFIGS.register(name)(cls)
    return cls
