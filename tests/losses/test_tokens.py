"""Token-distribution divergences: golden values, analytic gradients, mathematical properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses.tokens import (
    DIVERGENCES,
    LOG_PROB_FLOOR,
    DivergenceSpec,
    divergence_per_token,
    divergence_value_and_grad,
)

KL_TYPE = tuple(d for d in DIVERGENCES if d != "tvd")
INF = float("inf")


# ----------------------------------------------------------------------------------------------------
# Naive oracle: explicit sums over probabilities in Python floats (float64), no log-softmax tricks.
# ----------------------------------------------------------------------------------------------------


def _probs(row: list[float], t: float) -> list[float]:
    top = max(row)
    e = [math.exp((x - top) / t) for x in row]
    s = sum(e)
    return [x / s for x in e]


def _kl(a: list[float], b: list[float]) -> float:
    """KL(a || b) with 0 log 0 = 0; log b floored like the library (only matters for masked entries)."""
    total = 0.0
    for ai, bi in zip(a, b, strict=True):
        if ai > 0:
            log_b = math.log(bi) if bi > 0 else -INF
            total += ai * (math.log(ai) - max(log_b, LOG_PROB_FLOOR))
    return total


def naive_divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    name: str,
    t: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    out = []
    for z_row, y_row in zip(student.tolist(), teacher.tolist(), strict=True):
        q, p = _probs(z_row, t), _probs(y_row, t)
        if name == "forward_kl" or (name == "jsd" and beta == 0):
            d = _kl(p, q)
        elif name == "reverse_kl" or (name == "jsd" and beta == 1):
            d = _kl(q, p)
        elif name == "jsd":
            m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
            d = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
        elif name == "skew_forward_kl":
            d = _kl(p, [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q, strict=True)])
        elif name == "skew_reverse_kl":
            d = _kl(q, [(1 - alpha) * pi + alpha * qi for pi, qi in zip(p, q, strict=True)])
        else:
            d = 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q, strict=True))
        out.append(d * t * t)
    return torch.tensor(out, dtype=torch.float64)


def autograd_grad(student: torch.Tensor, teacher: torch.Tensor, spec: DivergenceSpec) -> torch.Tensor:
    z = student.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(divergence_per_token(z, teacher, spec).sum(), z)
    return grad


def _pair(seed: int, n: int = 4, v: int = 9, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    y = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    return z, y


SPECS = [
    DivergenceSpec(name, temperature, beta=beta, alpha=alpha)
    for name in DIVERGENCES
    for temperature in (1.0, 0.5, 2.5)
    for beta, alpha in ((0.5, 0.1), (0.2, 0.7))
] + [
    DivergenceSpec("jsd", 1.5, beta=0.0),
    DivergenceSpec("jsd", 1.5, beta=1.0),
    DivergenceSpec("skew_forward_kl", 1.5, alpha=0.0),
    DivergenceSpec("skew_reverse_kl", 1.5, alpha=0.0),
]


def _id(spec: DivergenceSpec) -> str:
    return f"{spec.name}-T{spec.temperature}-b{spec.beta}-a{spec.alpha}"


# ----------------------------------------------------------------------------------------------------
# Golden tests
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_values_match_naive_oracle(spec: DivergenceSpec) -> None:
    z, y = _pair(0)
    expected = naive_divergence(z, y, spec.name, spec.temperature, spec.beta, spec.alpha)
    torch.testing.assert_close(divergence_per_token(z, y, spec), expected, rtol=1e-9, atol=1e-9)
    values, _ = divergence_value_and_grad(z, y, spec)
    torch.testing.assert_close(values, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_analytic_grad_matches_autograd(spec: DivergenceSpec) -> None:
    z, y = _pair(1)
    _, grad = divergence_value_and_grad(z, y, spec)
    assert grad.dtype == torch.float64
    torch.testing.assert_close(grad, autograd_grad(z, y, spec), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_masked_teacher_entries_are_finite_and_match_oracle(name: str) -> None:
    z, y = _pair(2, n=3, v=8)
    y[0, 2] = -INF
    y[1, :5] = -INF  # most of the vocabulary masked
    y[2, 7] = -INF
    z[1, 1] += 4.0  # student puts real mass on a masked entry
    spec = DivergenceSpec(name, temperature=1.3)
    ref = divergence_per_token(z, y, spec)
    values, grad = divergence_value_and_grad(z, y, spec)
    auto = autograd_grad(z, y, spec)
    for tensor in (ref, values, grad, auto):
        assert torch.isfinite(tensor).all()
    expected = naive_divergence(z, y, name, spec.temperature, spec.beta, spec.alpha)
    torch.testing.assert_close(ref, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(values, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, auto, rtol=1e-7, atol=1e-9)


def test_forward_kl_ignores_masked_entries() -> None:
    """With p = 0 on masked entries, forward KL only sums over the teacher's support."""
    z, y = _pair(3, n=2, v=6)
    masked = y.clone()
    masked[:, 4:] = -INF
    spec = DivergenceSpec("forward_kl")
    p = torch.softmax(masked, -1)[:, :4]
    log_q = torch.log_softmax(z, -1)[:, :4]
    expected = (p * (p.log() - log_q)).sum(-1)
    torch.testing.assert_close(divergence_per_token(z, masked, spec), expected)


def test_finfo_min_masking_behaves_like_minus_inf() -> None:
    z, y = _pair(4, n=2, v=6)
    inf_masked, min_masked = y.clone(), y.clone()
    inf_masked[:, 0] = -INF
    min_masked[:, 0] = torch.finfo(y.dtype).min
    for name in DIVERGENCES:
        spec = DivergenceSpec(name)
        a, ga = divergence_value_and_grad(z, inf_masked, spec)
        b, gb = divergence_value_and_grad(z, min_masked, spec)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32(name: str, dtype: torch.dtype) -> None:
    z, y = _pair(5, n=8, v=300)
    z, y = z.to(dtype), y.to(dtype)
    spec = DivergenceSpec(name, temperature=2.0)
    values, grad = divergence_value_and_grad(z, y, spec)
    assert values.dtype == grad.dtype == torch.float32
    z64, y64 = z.double(), y.double()  # the same (rounded) inputs, exactly
    torch.testing.assert_close(values.double(), divergence_per_token(z64, y64, spec), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad.double(), autograd_grad(z64, y64, spec), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_extreme_logits_stay_finite(name: str) -> None:
    z, y = _pair(6, n=3, v=50, scale=1e4)  # near one-hot, log-probs down to -1e5
    for spec in (DivergenceSpec(name), DivergenceSpec(name, temperature=0.1)):
        values, grad = divergence_value_and_grad(z.float(), y.float(), spec)
        assert torch.isfinite(values).all() and torch.isfinite(grad).all()
        assert torch.isfinite(divergence_per_token(z, y, spec)).all()


def test_inputs_are_not_modified() -> None:
    z, y = _pair(7)
    z0, y0 = z.clone(), y.clone()
    for name in DIVERGENCES:
        divergence_value_and_grad(z, y, DivergenceSpec(name))
        divergence_value_and_grad(z.float(), y.float(), DivergenceSpec(name, temperature=1.0))
    assert torch.equal(z, z0) and torch.equal(y, y0)


@pytest.mark.parametrize("spec", SPECS, ids=_id)
@pytest.mark.parametrize("reuse", [(True, False), (False, True), (True, True)], ids=["s", "t", "st"])
def test_handing_over_storage_changes_nothing_but_the_inputs(
    spec: DivergenceSpec, reuse: tuple[bool, bool]
) -> None:
    """reuse_student/reuse_teacher compute in the given buffers: same values and gradient as copies."""
    z, y = _pair(8)
    y[1, 3] = -INF
    expected = divergence_value_and_grad(z, y, spec)
    zc, yc = z.clone(), y.clone()
    got = divergence_value_and_grad(zc, yc, spec, reuse_student=reuse[0], reuse_teacher=reuse[1])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(zc, z) != reuse[0] and torch.equal(yc, y) != reuse[1]  # the handed-over ones change


@pytest.mark.parametrize("spec", SPECS, ids=_id)
@pytest.mark.parametrize(
    "reuse", [(False, False), (True, False), (False, True), (True, True)], ids=["-", "s", "t", "st"]
)
@pytest.mark.parametrize("padded", [False, True], ids=["contiguous", "padded-teacher"])
def test_row_blocks_give_the_same_bits(spec: DivergenceSpec, reuse: tuple[bool, bool], padded: bool) -> None:
    """Row blocks (2 rows of 9, last block 1 row) == one block, bit for bit, however the inputs are
    handed over; a teacher sliced from a padded head (a strided view) included."""
    z, y = _pair(9, n=7)
    y[2, 4] = -INF
    y_pad = torch.cat([y, torch.full((7, 3), -5.0, dtype=y.dtype)], dim=1)

    def inputs() -> tuple[torch.Tensor, torch.Tensor]:
        return z.clone(), (y_pad.clone()[:, :9] if padded else y.clone())

    flags = {"reuse_student": reuse[0], "reuse_teacher": reuse[1]}
    expected = divergence_value_and_grad(*inputs(), spec, **flags, block_elements=None)
    zc, yc = inputs()
    values, grad = divergence_value_and_grad(zc, yc, spec, **flags, block_elements=18)
    assert torch.equal(values, expected[0]) and torch.equal(grad, expected[1])
    assert torch.equal(zc, z) != reuse[0]  # only the handed-over input is overwritten
    if not reuse[1]:
        assert torch.equal(yc, y)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_grad_scale_scales_the_gradient_only(name: str) -> None:
    z, y = _pair(10, n=5)
    spec = DivergenceSpec(name, temperature=2.0)
    v1, g1 = divergence_value_and_grad(z, y, spec)
    for block in (None, 18):
        v2, g2 = divergence_value_and_grad(z, y, spec, grad_scale=-0.3, block_elements=block)
        torch.testing.assert_close(v2, v1, rtol=1e-14, atol=0)
        torch.testing.assert_close(g2, -0.3 * g1, rtol=1e-12, atol=1e-15)


def test_handed_over_student_holds_the_blocked_gradient() -> None:
    """Forward KL writes its gradient into the student's buffer, block by block: no (N, V) allocation."""
    z, y = _pair(11, n=7)
    zc = z.clone()
    _, grad = divergence_value_and_grad(zc, y, DivergenceSpec(), reuse_student=True, block_elements=18)
    assert grad.data_ptr() == zc.data_ptr()


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="same"):
        divergence_per_token(torch.zeros(2, 5), torch.zeros(2, 6), DivergenceSpec())
    with pytest.raises(ValueError, match="same"):
        divergence_value_and_grad(torch.zeros(2, 5), torch.zeros(3, 5), DivergenceSpec())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "kl"}, "name"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"beta": -0.1}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": -0.2}, "alpha"),
    ],
)
def test_spec_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        DivergenceSpec(**kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------


@st.composite
def logit_pairs(draw: st.DrawFn, lo: float = -8.0, hi: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    n = draw(st.integers(1, 3))
    v = draw(st.integers(2, 10))
    floats = st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    z = draw(st.lists(floats, min_size=n * v, max_size=n * v))
    y = draw(st.lists(floats, min_size=n * v, max_size=n * v))
    as_tensor = torch.tensor
    return as_tensor(z, dtype=torch.float64).view(n, v), as_tensor(y, dtype=torch.float64).view(n, v)


specs = st.builds(
    DivergenceSpec,
    name=st.sampled_from(DIVERGENCES),
    temperature=st.floats(0.5, 4.0),
    beta=st.floats(0.05, 0.95),
    alpha=st.floats(0.0, 0.9),
)
PROPERTY = settings(max_examples=150, deadline=None)


@PROPERTY
@given(pair=logit_pairs(), spec=specs)
def test_property_analytic_equals_reference(
    pair: tuple[torch.Tensor, torch.Tensor], spec: DivergenceSpec
) -> None:
    z, y = pair
    values, grad = divergence_value_and_grad(z, y, spec)
    torch.testing.assert_close(values, divergence_per_token(z, y, spec), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(grad, autograd_grad(z, y, spec), rtol=1e-7, atol=1e-10)
    # softmax is shift-invariant, so each row of the gradient sums to zero
    torch.testing.assert_close(grad.sum(-1), torch.zeros(z.shape[0], dtype=z.dtype), rtol=0, atol=1e-10)


@PROPERTY
@given(pair=logit_pairs(), spec=specs)
def test_property_nonnegative_and_bounded(
    pair: tuple[torch.Tensor, torch.Tensor], spec: DivergenceSpec
) -> None:
    z, y = pair
    values = divergence_per_token(z, y, spec)
    assert (values >= -1e-6).all()
    if spec.name == "tvd":
        assert (values <= spec.temperature**2 + 1e-9).all()


@PROPERTY
@given(pair=logit_pairs(), spec=specs, shift=st.floats(-50, 50))
def test_property_zero_iff_same_distribution(
    pair: tuple[torch.Tensor, torch.Tensor], spec: DivergenceSpec, shift: float
) -> None:
    z, y = pair
    shifts = torch.linspace(-1.0, 1.0, z.shape[0], dtype=z.dtype).unsqueeze(1) * shift
    for student in (y.clone(), y + shifts):  # same logits, or the same up to a per-row constant
        values, _ = divergence_value_and_grad(student, y, spec)
        torch.testing.assert_close(values, torch.zeros_like(values), rtol=0, atol=1e-9)
        torch.testing.assert_close(divergence_per_token(student, y, spec), values, rtol=0, atol=1e-9)
    p, q = torch.softmax(y / spec.temperature, -1), torch.softmax(z / spec.temperature, -1)
    differ = (p - q).abs().amax(-1) > 1e-3
    assert (divergence_per_token(z, y, spec)[differ] > 0).all()


@PROPERTY
@given(pair=logit_pairs(-1.5, 1.5), temperature=st.floats(1.0, 3.0))
def test_property_jsd_limits(pair: tuple[torch.Tensor, torch.Tensor], temperature: float) -> None:
    """JSD/beta -> KL(p||q) as beta -> 0 and JSD/(1-beta) -> KL(q||p) as beta -> 1 (error ~ beta * chi^2)."""
    z, y = pair
    forward = divergence_per_token(z, y, DivergenceSpec("forward_kl", temperature))
    reverse = divergence_per_token(z, y, DivergenceSpec("reverse_kl", temperature))
    low, high = 1e-6, 1 - 1e-6
    near0 = divergence_per_token(z, y, DivergenceSpec("jsd", temperature, beta=low)) / low
    near1 = divergence_per_token(z, y, DivergenceSpec("jsd", temperature, beta=high)) / (1 - high)
    # atol: float64 rounding of the O(1) terms (~1e-16), divided by 1e-6
    torch.testing.assert_close(near0, forward, rtol=1e-3, atol=1e-8)
    torch.testing.assert_close(near1, reverse, rtol=1e-3, atol=1e-8)


@settings(max_examples=50, deadline=None)
@given(pair=logit_pairs(-3.0, 3.0), temperature=st.floats(0.5, 4.0))
def test_property_end_points_are_plain_kls(
    pair: tuple[torch.Tensor, torch.Tensor], temperature: float
) -> None:
    z, y = pair
    forward = DivergenceSpec("forward_kl", temperature)
    reverse = DivergenceSpec("reverse_kl", temperature)
    same = [
        (DivergenceSpec("jsd", temperature, beta=0.0), forward),
        (DivergenceSpec("jsd", temperature, beta=1.0), reverse),
        (DivergenceSpec("skew_forward_kl", temperature, alpha=0.0), forward),
        (DivergenceSpec("skew_reverse_kl", temperature, alpha=0.0), reverse),
    ]
    for spec, plain in same:
        for fn in (divergence_per_token, lambda a, b, s: divergence_value_and_grad(a, b, s)[0]):
            assert torch.equal(fn(z, y, spec), fn(z, y, plain))
    # and the general skew formula (not the alpha == 0 shortcut) tends to the plain KLs; the error is
    # ~ alpha * max(p/q), at most 1e-10 * e^12 here
    tiny = 1e-10
    for name, plain in (("skew_forward_kl", forward), ("skew_reverse_kl", reverse)):
        torch.testing.assert_close(
            divergence_per_token(z, y, DivergenceSpec(name, temperature, alpha=tiny)),
            divergence_per_token(z, y, plain),
            rtol=1e-4,
            atol=1e-9,
        )
