"""Method configs of the language-model family (torch-free; implementations in methods/lm/)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from distill.configs.base import DISTRIBUTION, MethodConfigBase, Strict, register_method_config

if TYPE_CHECKING:
    from distill.recipe_base import RecipeBase

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


class QuantizeConfig(Strict):
    """Integer weights for every linear layer but the LM head. `qat`: trained fake-quantized (straight-through),
    i.e. quantization-aware distillation; `ptq`: trained in full precision and rounded after training, the
    baseline QAD must beat."""

    bits: int = Field(default=4, ge=2, le=8)
    group_size: int | None = Field(default=32, ge=1)  # None: one scale per output channel
    symmetric: bool = True
    mode: Literal["qat", "ptq"] = "qat"


class LMMethodConfig(MethodConfigBase):
    """Fields every language-model method has."""

    quantize: QuantizeConfig | None = None

    @property
    def needs_completions(self) -> bool:
        """Whether training reads the dataset's (or the teacher's) answers; False for methods that
        write every answer themselves, which can train on prompts alone."""
        return True


class DivergenceConfig(LMMethodConfig):
    """Fields of a method that matches the teacher's next-token distribution with one of GKD's divergences
    (Agarwal et al. 2024): `beta` mixes JSD, `alpha` the skew KLs. Not a method itself: no `name`."""

    divergence: Divergence = "forward_kl"
    temperature: float = Field(default=1.0, gt=0)
    beta: float = Field(default=0.5, ge=0, le=1)
    alpha: float = Field(default=0.1, ge=0, lt=1)


@register_method_config
class LogitKDConfig(DivergenceConfig):
    """Match the teacher's next-token distribution on the training text (Hinton et al. 2015; GKD's
    divergences, Agarwal et al. 2024)."""

    name: Literal["logit_kd"] = "logit_kd"
    kd_weight: float = Field(default=1.0, ge=0)
    ce_weight: float = Field(default=0.0, ge=0)
    tail: Literal["bucket", "renormalize"] = "bucket"  # sparse (cached/served) teachers only

    teacher_needs: ClassVar[frozenset[str]] = frozenset({DISTRIBUTION})


@register_method_config
class SeqKDConfig(LMMethodConfig):
    """Sequence-level KD (Kim & Rush 2016): plain cross-entropy on teacher-generated text."""

    name: Literal["seq_kd"] = "seq_kd"

    def check(self, recipe: RecipeBase) -> None:
        from distill.recipe import Recipe

        assert isinstance(recipe, Recipe)
        if recipe.teacher is None:
            raise ValueError("method 'seq_kd' needs a teacher section")
        if recipe.data.generate is None:
            raise ValueError("method 'seq_kd' trains on teacher-generated text: set data.generate")


@register_method_config
class SFTConfig(LMMethodConfig):
    """Supervised fine-tuning on the dataset's own completions; no teacher."""

    name: Literal["sft"] = "sft"


# methods that need no shared vocabulary: text-level losses, and cross-entropy on the (teacher's) text
CROSS_TOKENIZER_METHODS = ("cross_tokenizer_kd", "sft", "seq_kd")


def tokenizer_misfit(field: str, name: str, tokenizers_differ: bool) -> str | None:
    """Why method `name` (at recipe `field`) cannot run with these tokenizers; None when it can. One
    message for validation (when the recipe shows it) and for loading (a pretrained student's tokenizer)."""
    if tokenizers_differ and name not in CROSS_TOKENIZER_METHODS:
        return (
            f"{field}.name: {name!r} compares next-token distributions over one vocabulary, and the teacher's "
            f"and student's tokenizers differ; use one of {', '.join(CROSS_TOKENIZER_METHODS)}"
        )
    if not tokenizers_differ and name == "cross_tokenizer_kd":
        return (
            f"{field}.name: cross_tokenizer_kd is for a student whose tokenizer differs from the teacher's, and "
            "this student uses the teacher's; set student.tokenizer, or use logit_kd"
        )
    return None


AlmDivergence = Literal["binary_kl", "binary_reverse_kl", "abs_logp"]


@register_method_config
class CrossTokenizerKDConfig(LMMethodConfig):
    """Distil across tokenizers over character-aligned chunks of the answer: ALM (Minixhofer et al. 2025,
    approximate likelihood matching of chunk likelihoods) and ULD (Boizard et al. 2024, sorted-probability
    Wasserstein at the positions where both models see the same text), plus optional cross-entropy."""

    name: Literal["cross_tokenizer_kd"] = "cross_tokenizer_kd"
    alm_weight: float = Field(default=1.0, ge=0)
    alm_divergence: AlmDivergence = "binary_kl"
    uld_weight: float = Field(default=0.0, ge=0)
    ce_weight: float = Field(default=0.0, ge=0)
    temperature: float = Field(default=1.0, gt=0)

    teacher_needs: ClassVar[frozenset[str]] = frozenset({DISTRIBUTION})

    def check(self, recipe: RecipeBase) -> None:
        if self.alm_weight == 0 and self.uld_weight == 0 and self.ce_weight == 0:
            raise ValueError("every loss weight is 0; set alm_weight, uld_weight or ce_weight")
