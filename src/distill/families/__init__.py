"""Family plugins. Importing this package registers the built-in families."""

from distill.families import classifier, condense, diffusion, embed, lm
from distill.families.base import FAMILIES, Family

__all__ = ["FAMILIES", "Family", "classifier", "condense", "diffusion", "embed", "lm"]
