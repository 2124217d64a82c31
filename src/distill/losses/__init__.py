"""Pure loss functions (tensors in, tensors out; no module state, torch only)."""

from distill.losses.fused_head import TeacherLogitsFn, chunked_head_loss, reference_head_loss
from distill.losses.tokens import (
    DIVERGENCES,
    LOG_PROB_FLOOR,
    DivergenceSpec,
    divergence_per_token,
    divergence_value_and_grad,
)

__all__ = [
    "DIVERGENCES",
    "LOG_PROB_FLOOR",
    "DivergenceSpec",
    "TeacherLogitsFn",
    "chunked_head_loss",
    "divergence_per_token",
    "divergence_value_and_grad",
    "reference_head_loss",
]
