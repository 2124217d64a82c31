"""Recipe sections, torch-free. Importing this package registers every family's method configs."""

from distill.configs import classifier, condense, diffusion, embed, feature_drafter, lm, on_policy, reasoning
from distill.configs.base import METHOD_CONFIGS, MethodConfigBase, Strict

__all__ = [
    "METHOD_CONFIGS",
    "MethodConfigBase",
    "Strict",
    "classifier",
    "condense",
    "diffusion",
    "embed",
    "feature_drafter",
    "lm",
    "on_policy",
    "reasoning",
]
