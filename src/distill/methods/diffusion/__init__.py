"""Diffusion methods; importing this package registers them."""

from distill.methods.diffusion import consistency, denoise, dmd2, guidance, progressive, reflow, score_distill

__all__ = ["consistency", "denoise", "dmd2", "guidance", "progressive", "reflow", "score_distill"]
