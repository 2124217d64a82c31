"""Weight fake-quantization for quantization-aware distillation (QAD) and its post-training baseline (PTQ).

QAD trains a float master copy of each Linear weight while the forward pass sees the weight rounded to an
int`bits` grid, so the student learns to be accurate *after* quantization; PTQ rounds the weights once.
Both use the same round-to-nearest quantizer, so the two are compared on exactly the same grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from distill.errors import RecipeError

MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QuantSpec:
    """How weights are quantized. `group_size=None` means one scale per output channel."""

    bits: int = 4
    group_size: int | None = 32
    symmetric: bool = True


def _bad_bits(bits: Any) -> bool:
    return isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS


def _bad_group(group_size: Any) -> bool:
    return group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
    )


def quantize_weight(w: Tensor, spec: QuantSpec) -> Tensor:
    """Round-to-nearest: the dequantized weight (same shape/dtype as `w`) an int`bits` kernel computes with.

    The last dimension is the input width; scales come from each row's absmax (symmetric) or min/max
    (asymmetric, zero kept exactly representable), per row or per `group_size` consecutive inputs.
    Arithmetic is float32 (or float64 for float64 weights) so bfloat16 weights are not rounded twice.
    """
    if _bad_bits(spec.bits) or _bad_group(spec.group_size):
        raise ValueError(
            f"invalid QuantSpec {spec}: bits must be {MIN_BITS}..{MAX_BITS}, group_size >= 1 or None"
        )
    if w.dim() == 0:
        raise ValueError("quantize_weight needs a weight with an input dimension, got a scalar")
    width = w.shape[-1]
    group = width if spec.group_size is None else spec.group_size
    if width % group:
        raise ValueError(f"group_size {group} does not divide the input width {width}")
    compute = torch.promote_types(w.dtype, torch.float32)
    x = w.detach().to(compute).reshape(-1, width // group, group)
    if spec.symmetric:
        qmax = 2 ** (spec.bits - 1) - 1
        scale = x.abs().amax(dim=-1, keepdim=True) / qmax
        # An all-zero group has scale 0; any positive scale maps it to 0 exactly, without 0/0.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        deq = torch.round(x / scale).clamp_(-qmax, qmax).mul_(scale)
    else:
        qmax = 2**spec.bits - 1
        lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp_(0, qmax)
        deq = (torch.round(x / scale) + zero).clamp_(0, qmax).sub_(zero).mul_(scale)
    return deq.reshape(w.shape).to(w.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized weight, bit for bit. Backward: the identity (straight-through estimator).

    Equivalent to `w + (quantize_weight(w) - w).detach()` but without its rounding error in the forward,
    so the fake-quantized model computes exactly what the materialized one does.
    """

    @staticmethod
    def forward(ctx: Any, w: Tensor, spec: QuantSpec) -> Tensor:
        return quantize_weight(w, spec)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class FakeQuant(nn.Module):
    """Parametrization of a Linear weight: the forward sees the quantized weight, gradients reach the
    float master weight (`...parametrizations.weight.original`) unchanged."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, w: Tensor) -> Tensor:
        out: Tensor = _StraightThrough.apply(w, self.spec)
        return out

    def extra_repr(self) -> str:
        s = self.spec
        return f"bits={s.bits}, group_size={s.group_size}, symmetric={s.symmetric}"


def quantizable_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, nn.Linear]:
    """Every nn.Linear by qualified name, except names ending with an entry of `skip`.

    The LM head stays in full precision: small models tie it to the embeddings, and the project
    applies it fused with the loss.
    """
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(name.endswith(s) for s in skip)
    }


def check_spec(model: nn.Module, spec: QuantSpec, field: str = "method.quantize") -> None:
    """RecipeError naming `{field}.bits` or `{field}.group_size` when the spec cannot apply to `model`."""
    if _bad_bits(spec.bits):
        raise RecipeError(f"{field}.bits: {spec.bits!r} is outside {MIN_BITS}..{MAX_BITS}")
    if _bad_group(spec.group_size):
        raise RecipeError(f"{field}.group_size: {spec.group_size!r} must be a positive integer or null")
    if spec.group_size is None:
        return
    for name, linear in quantizable_linears(model).items():
        if linear.in_features % spec.group_size:
            raise RecipeError(
                f"{field}.group_size: {spec.group_size} does not divide the input width "
                f"{linear.in_features} of {name}"
            )


def _fake_quantized(linear: nn.Module) -> bool:
    if not parametrize.is_parametrized(linear, "weight"):
        return False
    plist = linear.parametrizations["weight"]  # type: ignore[index]
    return any(isinstance(p, FakeQuant) for p in plist)  # type: ignore[union-attr]


def _refuse_if_quantized(
    targets: dict[str, nn.Linear], field: str, any_parametrization: bool = False
) -> None:
    for name, linear in targets.items():
        if _fake_quantized(linear):
            raise RecipeError(
                f"{field}: the model is already fake-quantized ({name} has a FakeQuant weight); quantize once"
            )
        if any_parametrization and parametrize.is_parametrized(linear, "weight"):
            raise RecipeError(f"{field}: {name}.weight is parametrized; writing to it would be lost")


def add_fake_quant(model: nn.Module, spec: QuantSpec, field: str = "method.quantize") -> int:
    """Register FakeQuant on every quantizable Linear weight, in place (QAD training); returns how many.

    Validates everything before touching the model, and refuses a model that is already fake-quantized
    (quantizing twice would hide a pipeline bug behind a nearly idempotent quantizer).
    """
    check_spec(model, spec, field)
    targets = quantizable_linears(model)
    _refuse_if_quantized(targets, field)
    for linear in targets.values():
        parametrize.register_parametrization(linear, "weight", FakeQuant(spec))
    return len(targets)


def materialize(model: nn.Module) -> None:
    """Remove the FakeQuant parametrizations in place, leaving the quantized values as plain weights.

    The keys go back to `...weight` (and the Parameter objects stay the same), so `save_pretrained`
    writes a folder that `from_pretrained` loads and that computes with the quantized weights.
    """
    for module in list(model.modules()):
        if _fake_quantized(module):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def quantize_in_place(model: nn.Module, spec: QuantSpec, field: str = "method.quantize") -> int:
    """PTQ: overwrite every quantizable Linear weight with its round-to-nearest quantization; returns
    how many. The baseline QAD is compared against."""
    check_spec(model, spec, field)
    targets = quantizable_linears(model)
    _refuse_if_quantized(targets, field, any_parametrization=True)
    with torch.no_grad():
        for linear in targets.values():
            linear.weight.copy_(quantize_weight(linear.weight, spec))
    return len(targets)
