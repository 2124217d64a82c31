"""Diffusion methods; importing this package registers them."""

from distill.methods.diffusion import denoise

__all__ = ["denoise"]
