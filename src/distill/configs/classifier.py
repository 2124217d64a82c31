"""Method configs of the classifier family (torch-free; implementations in methods/classifier/).

Logit methods (Hinton KD, DKD, DIST, logit standardisation, teacher ensembles through the teacher
section, label-free KD through `data.unlabelled`), feature methods that read modules by path through
forward hooks (FitNet, AT, RKD, PKT, CRD, ND, One-for-All) and self-distillation (EMA teacher,
born-again generations with a ground-truth weight per round).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from distill.configs.base import DISTRIBUTION, HIDDEN_STATES, MethodConfigBase, Strict, register_method_config


class ClassifierMethodConfig(MethodConfigBase):
    family: ClassVar[str] = "classifier"
    ce_weight: float = Field(default=1.0, ge=0)  # cross-entropy on the labelled rows


@register_method_config
class CEConfig(ClassifierMethodConfig):
    """Cross-entropy on the labelled rows only; no teacher (the baseline every KD number is read against)."""

    name: Literal["ce"] = "ce"


class _SoftConfig(ClassifierMethodConfig):
    temperature: float = Field(default=4.0, gt=0)
    kd_weight: float = Field(default=1.0, ge=0)

    teacher_needs: ClassVar[frozenset[str]] = frozenset({DISTRIBUTION})


@register_method_config
class KDConfig(_SoftConfig):
    """Hinton et al. 2015: T^2 KL to the teacher's softened distribution, plus cross-entropy. With
    `standardize` the logits are z-scored per sample first (Sun et al. 2024, logit standardisation)."""

    name: Literal["kd"] = "kd"
    standardize: bool = False


@register_method_config
class DKDConfig(_SoftConfig):
    """Decoupled KD (Zhao et al. 2022): target-class and non-target-class terms with their own weights;
    the KD weight ramps up linearly over `warmup_steps` as in the paper."""

    name: Literal["dkd"] = "dkd"
    alpha: float = Field(default=1.0, ge=0)
    beta: float = Field(default=8.0, ge=0)
    temperature: float = Field(default=4.0, gt=0)
    warmup_steps: int = Field(default=0, ge=0)


@register_method_config
class DISTConfig(_SoftConfig):
    """DIST (Huang et al. 2022): match inter-class and intra-class Pearson relations, not values."""

    name: Literal["dist"] = "dist"
    beta: float = Field(default=1.0, ge=0)
    gamma: float = Field(default=1.0, ge=0)
    temperature: float = Field(default=1.0, gt=0)


class LayerPairConfig(Strict):
    """A student module and a teacher module, by dotted path (`layer3`, `blocks.5.mlp`)."""

    student: str
    teacher: str


class _FeatureConfig(_SoftConfig):
    """Feature methods read module outputs through forward hooks, so no model code changes; projectors
    (where widths differ) train with the student and are dropped at export. `kd_weight` adds Hinton KD."""

    pairs: list[LayerPairConfig] = Field(min_length=1)
    feature_weight: float = Field(default=1.0, ge=0)
    projector: Literal["auto", "none"] = "auto"  # none: shapes must already match
    kd_weight: float = Field(default=0.0, ge=0)

    teacher_needs: ClassVar[frozenset[str]] = frozenset({DISTRIBUTION, HIDDEN_STATES})


@register_method_config
class FitNetConfig(_FeatureConfig):
    """FitNets (Romero et al. 2015): regress the teacher's features through a learned projector."""

    name: Literal["fitnet"] = "fitnet"


@register_method_config
class ATConfig(_FeatureConfig):
    """Attention transfer (Zagoruyko & Komodakis 2017): match normalised spatial attention maps."""

    name: Literal["at"] = "at"
    p: float = Field(default=2.0, gt=0)
    feature_weight: float = Field(default=1000.0, ge=0)


@register_method_config
class RKDConfig(_FeatureConfig):
    """Relational KD (Park et al. 2019): distances and angles between samples' embeddings."""

    name: Literal["rkd"] = "rkd"
    distance_weight: float = Field(default=25.0, ge=0)
    angle_weight: float = Field(default=50.0, ge=0)


@register_method_config
class PKTConfig(_FeatureConfig):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018): match similarity distributions."""

    name: Literal["pkt"] = "pkt"


@register_method_config
class CRDConfig(_FeatureConfig):
    """Contrastive representation distillation (Tian et al. 2020) as InfoNCE against in-batch teacher
    embeddings, plus a FIFO memory bank of `memory_size` past ones (0: in-batch only)."""

    name: Literal["crd"] = "crd"
    memory_size: int = Field(default=0, ge=0)
    embed_dim: int = Field(default=64, ge=1)
    nce_temperature: float = Field(default=0.07, gt=0)


@register_method_config
class NDConfig(_FeatureConfig):
    """Norm and direction (Wang et al. 2023): align the student's embedding with the teacher's class-mean
    direction and keep its norm at least the teacher's."""

    name: Literal["nd"] = "nd"
    norm_weight: float = Field(default=1.0, ge=0)
    direction_weight: float = Field(default=1.0, ge=0)


@register_method_config
class OFAConfig(ClassifierMethodConfig):
    """One-for-All (Hao et al. 2023) for heterogeneous pairs: each named student stage gets an exit branch
    that projects its features into logit space, where the teacher's logits supervise it with the
    target-modulated loss; the branches are dropped at export."""

    name: Literal["ofa"] = "ofa"
    ce_weight: float = Field(default=0.0, ge=0)  # OFA's loss already holds the hard-label term
    stages: list[str] = Field(min_length=1)
    temperature: float = Field(default=1.0, gt=0)
    eps_exponent: float = Field(default=1.0, ge=0)
    ofa_weight: float = Field(default=1.0, ge=0)

    teacher_needs: ClassVar[frozenset[str]] = frozenset({DISTRIBUTION})


@register_method_config
class EMASelfConfig(ClassifierMethodConfig):
    """Self-distillation from an exponential moving average of the student (mean teacher): no external
    teacher; the average is updated in the engine's after-step hook."""

    name: Literal["ema_self"] = "ema_self"
    decay: float = Field(default=0.99, gt=0, lt=1)
    temperature: float = Field(default=4.0, gt=0)
    kd_weight: float = Field(default=1.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)


@register_method_config
class BornAgainConfig(ClassifierMethodConfig):
    """Born-again networks (Furlanello et al. 2018): generation 0 is the student architecture trained on
    labels; each next generation learns from the previous one. `gt_weights` sets the cross-entropy
    weight per round ("Even your teacher needs guidance"); its length is the number of generations after
    the first, and each round trains for `train.steps`."""

    name: Literal["born_again"] = "born_again"
    gt_weights: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    temperature: float = Field(default=4.0, gt=0)
    kd_weight: float = Field(default=1.0, ge=0)

    @model_validator(mode="after")
    def _weights(self) -> BornAgainConfig:
        if any(w < 0 for w in self.gt_weights):
            raise ValueError("gt_weights: every weight must be >= 0")
        return self


@register_method_config
class VQGraphConfig(_SoftConfig):
    """GNN-to-MLP with structure codes (after VQGraph, Yang et al. 2024): besides the class soft labels,
    the student matches each node's soft assignment to a codebook of the GNN's hidden states. Simplified:
    the codebook is k-means over the trained teacher's last hidden layer (the paper learns it with a
    VQ-VAE). `student_layer` names the student module whose output is projected into the codebook space."""

    name: Literal["vqgraph"] = "vqgraph"
    temperature: float = Field(default=1.0, gt=0)
    student_layer: str
    codes: int = Field(default=32, ge=2)
    code_temperature: float = Field(default=1.0, gt=0)
    code_weight: float = Field(default=1.0, ge=0)
