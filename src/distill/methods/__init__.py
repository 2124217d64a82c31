"""Method plugins. Importing this package registers the built-in methods."""

from distill.methods import base
from distill.methods.lm import cross_entropy, logit_kd

METHODS = base.METHODS

__all__ = ["METHODS", "cross_entropy", "logit_kd"]
