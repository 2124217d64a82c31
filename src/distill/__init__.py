"""distill: distil a teacher model into a smaller student."""

__version__ = "0.1.0"
