"""Weight fake-quantization: the quantizer against a naive float64 reference, the straight-through
gradient, and the QAD/PTQ round trip on a tiny Llama."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize
from transformers import LlamaForCausalLM

from distill.errors import RecipeError
from distill.models.fake_quant import (
    FakeQuant,
    QuantSpec,
    add_fake_quant,
    check_spec,
    materialize,
    quantizable_linears,
    quantize_in_place,
    quantize_weight,
)
from tests.conftest import tiny_llama

SPECS = [
    QuantSpec(bits, group, sym) for bits in (2, 3, 4, 8) for group in (None, 32) for sym in (True, False)
]


def _id(spec: QuantSpec) -> str:
    return f"b{spec.bits}-g{spec.group_size}-{'sym' if spec.symmetric else 'asym'}"


def _reference(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Naive float64 round-to-nearest with explicit loops: (dequantized, step, unrounded level) per element."""
    deq, steps, levels = [], [], []
    for row in w.double().tolist():
        g = len(row) if spec.group_size is None else spec.group_size
        d_row, s_row, l_row = [], [], []
        for start in range(0, len(row), g):
            vals = row[start : start + g]
            if spec.symmetric:
                qmax = 2 ** (spec.bits - 1) - 1
                qlo, qhi = -qmax, qmax
                step = max(abs(v) for v in vals) / qmax
            else:
                qmax = 2**spec.bits - 1
                qlo, qhi = 0, qmax
                lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
                step = (hi - lo) / qmax
            if step == 0.0:
                step = 1.0
            zero = 0 if spec.symmetric else min(max(round(-lo / step), 0), qmax)
            for v in vals:
                level = v / step + zero
                q = min(max(round(level), qlo), qhi)  # round(): half to even, like torch.round
                d_row.append((q - zero) * step)
                s_row.append(step)
                l_row.append(level)
        deq.append(d_row)
        steps.append(s_row)
        levels.append(l_row)
    return (
        torch.tensor(deq, dtype=torch.float64),
        torch.tensor(steps, dtype=torch.float64),
        torch.tensor(levels, dtype=torch.float64),
    )


def _weights(seed: int = 0) -> torch.Tensor:
    """Rows that exercise the corner cases: mixed signs, all positive, all negative, a zero group, an outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 96, generator=g) * 0.05
    w[1] = w[1].abs()
    w[2] = -w[2].abs()
    w[3, 32:64] = 0.0
    w[4, 7] = 0.9
    w[5] += 0.03
    return w


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_matches_the_naive_reference(spec: QuantSpec) -> None:
    w = _weights()
    got = quantize_weight(w, spec)
    assert got.shape == w.shape and got.dtype == w.dtype
    ref, step, level = _reference(w, spec)
    err = (got.double() - ref).abs()
    # float32 vs float64 may round differently only at an exact half-step tie; there by one step at most
    tie = ((level - level.floor()) - 0.5).abs() < 1e-4
    assert (err[~tie] <= 1e-4 * step[~tie]).all(), f"max error {(err / step)[~tie].max():.3g} steps"
    assert (err[tie] <= step[tie] * (1 + 1e-4)).all()
    assert tie.sum() <= 2


@pytest.mark.parametrize("spec", SPECS, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_lie_on_the_grid(spec: QuantSpec, dtype: torch.dtype) -> None:
    w = _weights(1).to(dtype)
    got = quantize_weight(w, spec)
    assert got.dtype == dtype and torch.isfinite(got).all()
    group = w.shape[1] if spec.group_size is None else spec.group_size
    levels = 2**spec.bits - (1 if spec.symmetric else 0)
    for row in got.float():
        for chunk in row.split(group):
            assert chunk.unique().numel() <= levels
    assert (got[3, 32:64] == 0).all()  # the zero group stays zero (no 0/0)
    if dtype == torch.bfloat16:  # computed in float32 from the exact bfloat16 values, rounded once
        assert torch.equal(got, quantize_weight(w.float(), spec).to(dtype))


@pytest.mark.parametrize("symmetric", [True, False])
def test_zeros_stay_zero(symmetric: bool) -> None:
    for group in (None, 8):
        got = quantize_weight(torch.zeros(4, 16), QuantSpec(4, group, symmetric))
        assert torch.equal(got, torch.zeros(4, 16))


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_error_is_small(symmetric: bool) -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    for group, bound in ((32, 0.01), (None, 0.02)):
        got = quantize_weight(w, QuantSpec(8, group, symmetric))
        assert (got - w).norm() / w.norm() < bound
    # 4 bits is coarser: the error must grow, or the test could not tell the bit widths apart
    assert (quantize_weight(w, QuantSpec(4, 32, symmetric)) - w).norm() / w.norm() > 0.05


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_idempotent(spec: QuantSpec) -> None:
    once = quantize_weight(_weights(3), spec)
    twice = quantize_weight(once, spec)
    # Same integer levels; the recomputed scale may differ from the first one by float32 rounding,
    # so values agree to a few ulps (rtol 1e-6), not necessarily bit for bit.
    torch.testing.assert_close(twice, once, rtol=1e-6, atol=0.0)


def test_rejects_a_group_that_does_not_divide() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(torch.randn(4, 48), QuantSpec(4, 32))


def _step(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    x = w.double().reshape(w.shape[0], -1, w.shape[1] if spec.group_size is None else spec.group_size)
    if spec.symmetric:
        step = x.abs().amax(-1, keepdim=True) / (2 ** (spec.bits - 1) - 1)
    else:
        step = (x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)) / (
            2**spec.bits - 1
        )
    return step.expand_as(x).reshape(w.shape)


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(1, 4),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([None, 1, 2, 8, 32]),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    log_mag=st.floats(-6, 6),
    shift=st.floats(-3, 3),
    bf16=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_error_is_at_most_half_a_step(
    rows: int,
    groups: int,
    group_size: int | None,
    bits: int,
    symmetric: bool,
    log_mag: float,
    shift: float,
    bf16: bool,
    seed: int,
) -> None:
    spec = QuantSpec(bits, group_size, symmetric)
    width = groups * (group_size or 8)
    w = (torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) + shift) * 10**log_mag
    w = w.to(torch.bfloat16 if bf16 else torch.float32)
    got = quantize_weight(w, spec).double()
    step = _step(w, spec)
    # float32 arithmetic near a half-step tie; bfloat16 additionally rounds the result to 8 significant bits
    slack = 1e-4 * step + (got.abs() * 2.0**-8 if bf16 else 0.0)
    assert ((got - w.double()).abs() <= step / 2 + slack).all()


def test_straight_through_gradient_is_exact() -> None:
    torch.manual_seed(4)
    spec = QuantSpec(3, 8, symmetric=False)
    fq = nn.Linear(16, 6, bias=True)
    parametrize.register_parametrization(fq, "weight", FakeQuant(spec))
    plain = nn.Linear(16, 6, bias=True)
    with torch.no_grad():
        plain.weight.copy_(quantize_weight(fq.parametrizations.weight.original, spec))
        plain.bias.copy_(fq.bias)
    assert torch.equal(fq.weight, plain.weight)  # the forward sees exactly the quantized values
    x = torch.randn(5, 16)
    for layer in (fq, plain):
        torch.tanh(layer(x)).pow(3).sum().backward()
    master = fq.parametrizations.weight.original
    assert master.grad is not None and plain.weight.grad is not None
    assert master.grad.abs().sum() > 0
    assert torch.equal(master.grad, plain.weight.grad)
    assert torch.equal(fq.bias.grad, plain.bias.grad)


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(vocab=64, layers=2, hidden=32, seed=seed).eval()


def test_qad_and_ptq_round_trip_on_llama(tmp_path: Path) -> None:
    model = _tiny_llama()
    original = copy.deepcopy(model)
    keys = list(original.state_dict())
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    spec = QuantSpec(4, 32)

    ptq = copy.deepcopy(model)
    assert quantize_in_place(ptq, spec) == 14
    assert add_fake_quant(model, spec) == 14  # q, k, v, o, gate, up, down in two layers; not lm_head
    assert all(k.endswith("parametrizations.weight.original") for k in model.state_dict() if "q_proj" in k)
    # the master weights stay float
    q_proj = model.model.layers[0].self_attn.q_proj
    assert torch.equal(
        q_proj.parametrizations.weight.original, original.model.layers[0].self_attn.q_proj.weight
    )

    with torch.no_grad():
        float_logits = original(ids).logits
        fq_logits = model(ids).logits
        ptq_logits = ptq(ids).logits
    assert not torch.allclose(fq_logits, float_logits, atol=1e-3)  # quantization changed the model
    assert torch.equal(fq_logits, ptq_logits)

    # training reaches every master weight
    model(ids, labels=ids).loss.backward()
    for name, linear in quantizable_linears(model).items():
        grad = linear.parametrizations.weight.original.grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.zero_grad()

    materialize(model)
    assert list(model.state_dict()) == keys
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fq_logits)
    # LM head and (tied) embeddings untouched, norms untouched
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)
    assert torch.equal(model.model.norm.weight, original.model.norm.weight)
    assert torch.equal(q_proj.weight, quantize_weight(original.model.layers[0].self_attn.q_proj.weight, spec))

    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert list(loaded.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, fq_logits)


def test_linear_with_bias_round_trips() -> None:
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    keys = set(net.state_dict())
    bias = net[0].bias.detach().clone()
    x = torch.randn(3, 16)
    assert add_fake_quant(net, QuantSpec(4, 8)) == 2
    expected = net(x)
    materialize(net)
    assert set(net.state_dict()) == keys
    assert torch.equal(net[0].bias, bias)
    assert torch.equal(net(x), expected)


def test_skip_keeps_named_linears_in_full_precision() -> None:
    model = _tiny_llama()
    names = quantizable_linears(model)
    assert "lm_head" not in names and "model.layers.0.self_attn.q_proj" in names
    assert "model.layers.0.mlp.down_proj" not in quantizable_linears(model, skip=("lm_head", "down_proj"))


def test_bad_group_size_names_the_field_and_the_layer() -> None:
    model = _tiny_llama()
    with pytest.raises(RecipeError) as err:
        check_spec(model, QuantSpec(4, 48))
    assert str(err.value).startswith(
        "method.quantize.group_size: 48 does not divide the input width 32 of model."
    )
    for bad in (0, -8):
        with pytest.raises(RecipeError, match=r"^method\.quantize\.group_size"):
            check_spec(model, QuantSpec(4, bad))
    with pytest.raises(RecipeError, match=r"^student\.quant\.group_size"):
        check_spec(model, QuantSpec(4, 48), field="student.quant")
    # validated before anything is touched
    with pytest.raises(RecipeError):
        add_fake_quant(model, QuantSpec(4, 48))
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    check_spec(model, QuantSpec(4, None))  # per-channel always fits
    check_spec(model, QuantSpec(4, 16))


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bits_out_of_range(bits: int) -> None:
    model = _tiny_llama()
    with pytest.raises(RecipeError, match=r"^method\.quantize\.bits"):
        check_spec(model, QuantSpec(bits=bits))
    with pytest.raises(RecipeError, match=r"^method\.quantize\.bits"):
        quantize_in_place(model, QuantSpec(bits=bits))


def test_refuses_to_quantize_twice() -> None:
    model = _tiny_llama()
    add_fake_quant(model, QuantSpec())
    with pytest.raises(RecipeError, match="already fake-quantized"):
        add_fake_quant(model, QuantSpec())
    with pytest.raises(RecipeError, match="already fake-quantized"):
        quantize_in_place(model, QuantSpec())
    materialize(model)
    assert add_fake_quant(model, QuantSpec()) == 14  # a materialized model is plain again


def test_per_channel_scale_follows_each_row() -> None:
    # one large row must not coarsen the grid of the small one (the scale is per output channel)
    w = torch.tensor([[0.01, -0.02, 0.03, 0.005], [10.0, -20.0, 30.0, 5.0]])
    got = quantize_weight(w, QuantSpec(8, None))
    assert torch.allclose(got[0], w[0], atol=0.03 / 127 / 2 * (1 + 1e-4))
    assert not math.isclose(float(got[0].abs().sum()), 0.0)
