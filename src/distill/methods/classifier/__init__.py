"""Classifier-family methods; importing this package registers them."""

from distill.methods.classifier import features, logits, ofa, self_distill, vqgraph

__all__ = ["features", "logits", "ofa", "self_distill", "vqgraph"]
