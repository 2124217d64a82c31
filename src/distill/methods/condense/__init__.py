"""Dataset-distillation methods; importing this package registers them."""

from distill.methods.condense import matching, trajectory

__all__ = ["matching", "trajectory"]
