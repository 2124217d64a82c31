"""Embedding and relation losses: naive float64 references (explicit loops), invariances, stability."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses.embedding import (
    cosine_embedding_loss,
    embedding_mse_loss,
    relation_kl_loss,
    similarity_kl_loss,
    similarity_mse_loss,
)

PROPS = settings(max_examples=30, deadline=None)
F64 = torch.float64
SEEDS = st.integers(0, 2**31 - 1)
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def _mask(b: int, n: int, seed: int) -> torch.Tensor:
    """Random (B, T) real-token mask, every sample with at least one real token."""
    m = torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) < 0.6
    m[:, 0] |= ~m.any(dim=1)
    return m


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _cos(a: list[float], b: list[float]) -> float:
    return _dot(a, b) / math.sqrt(_dot(a, a) * _dot(b, b))


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(x - top) for x in row]
    return [x / sum(e) for x in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def _close(got: torch.Tensor, want: list[float]) -> None:
    assert got.dtype == F64 and got.shape == (len(want),)
    torch.testing.assert_close(got, _t(want), atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Golden references
# ----------------------------------------------------------------------------------------------------


def test_embedding_mse_golden() -> None:
    s, t = _randn(4, 7, seed=1), _randn(4, 7, seed=2, scale=3.0)
    want = [
        sum((a - b) ** 2 for a, b in zip(x, y, strict=True)) / 7
        for x, y in zip(s.tolist(), t.tolist(), strict=True)
    ]
    _close(embedding_mse_loss(s, t), want)


def test_cosine_embedding_golden() -> None:
    s, t = _randn(5, 6, seed=3), _randn(5, 6, seed=4, scale=0.1)
    _close(cosine_embedding_loss(s, t), [1 - _cos(x, y) for x, y in zip(s.tolist(), t.tolist(), strict=True)])


def naive_similarity_kl(s: torch.Tensor, t: torch.Tensor, tau: float) -> list[float]:
    es, et = s.tolist(), t.tolist()
    out = []
    for i in range(len(es)):
        others = [j for j in range(len(es)) if j != i]
        q = _softmax([_cos(es[i], es[j]) / tau for j in others])
        p = _softmax([_cos(et[i], et[j]) / tau for j in others])
        out.append(_kl(p, q))
    return out


@pytest.mark.parametrize("tau", [0.05, 0.5, 2.0])
def test_similarity_kl_golden(tau: float) -> None:
    s, t = _randn(6, 3, seed=5), _randn(6, 8, seed=6, scale=4.0)  # widths differ
    _close(similarity_kl_loss(s, t, tau), naive_similarity_kl(s, t, tau))
    assert similarity_kl_loss(s[:2], t[:2], tau).abs().max() < 1e-15  # one neighbour: always 0


def test_similarity_mse_golden() -> None:
    s, t = _randn(5, 4, seed=7), _randn(5, 9, seed=8)
    es, et = s.tolist(), t.tolist()
    want = [
        sum((_cos(es[i], es[j]) - _cos(et[i], et[j])) ** 2 for j in range(5) if j != i) / 4 for i in range(5)
    ]
    _close(similarity_mse_loss(s, t), want)


def naive_relation_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, heads: int) -> list[float]:
    b, n = mask.shape

    def relation(x: list[list[float]], h: int, i: int, real: list[int]) -> list[float]:
        dh = len(x[0]) // heads
        qi = x[i][h * dh : (h + 1) * dh]
        return _softmax([_dot(qi, x[j][h * dh : (h + 1) * dh]) / math.sqrt(dh) for j in real])

    out = []
    for k in range(b):
        real = [i for i in range(n) if mask[k, i]]
        xs, xt = s[k].tolist(), t[k].tolist()
        per_head = [
            sum(_kl(relation(xt, h, i, real), relation(xs, h, i, real)) for i in real) for h in range(heads)
        ]
        out.append(sum(per_head) / heads)
    return out


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_relation_kl_golden(heads: int) -> None:
    s, t = _randn(4, 5, 8, seed=9), _randn(4, 5, 12, seed=10, scale=2.0)  # widths differ
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 0, 1]], dtype=torch.bool
    )  # no padding, right padding, left padding, holes
    _close(relation_kl_loss(s, t, mask, heads), naive_relation_kl(s, t, mask, heads))
    # an integer (Hugging Face style) attention mask means the same
    _close(relation_kl_loss(s, t, mask.long(), heads), naive_relation_kl(s, t, mask, heads))


# ----------------------------------------------------------------------------------------------------
# Bad shapes and arguments: ValueError with a one-line message
# ----------------------------------------------------------------------------------------------------

_BAD: list[tuple[str, Callable[[], object], str]] = [
    ("mse_width", lambda: embedding_mse_loss(torch.zeros(2, 3), torch.zeros(2, 4)), "same shape"),
    ("mse_rank", lambda: embedding_mse_loss(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1)), "(B, D)"),
    ("cos_batch", lambda: cosine_embedding_loss(torch.zeros(2, 3), torch.zeros(3, 3)), "same shape"),
    ("skl_batch", lambda: similarity_kl_loss(torch.zeros(2, 3), torch.zeros(3, 3)), "same B"),
    ("skl_rank", lambda: similarity_kl_loss(torch.zeros(4), torch.zeros(4)), "same B"),
    ("skl_one", lambda: similarity_kl_loss(torch.zeros(1, 3), torch.zeros(1, 5)), "at least 2"),
    ("skl_tau", lambda: similarity_kl_loss(torch.zeros(3, 3), torch.zeros(3, 3), 0.0), "temperature"),
    ("skl_nan", lambda: similarity_kl_loss(torch.zeros(3, 3), torch.zeros(3, 3), math.nan), "temperature"),
    ("smse_one", lambda: similarity_mse_loss(torch.zeros(1, 3), torch.zeros(1, 3)), "at least 2"),
    ("smse_rank", lambda: similarity_mse_loss(torch.zeros(2, 3, 1), torch.zeros(2, 3)), "same B"),
    (
        "rel_rank",
        lambda: relation_kl_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool), 1),
        "(B, T, Ds)",
    ),
    (
        "rel_len",
        lambda: relation_kl_loss(
            torch.zeros(2, 4, 6), torch.zeros(2, 5, 6), torch.ones(2, 4, dtype=torch.bool), 1
        ),
        "(B, T, Ds)",
    ),
    (
        "rel_mask",
        lambda: relation_kl_loss(
            torch.zeros(2, 4, 6), torch.zeros(2, 4, 6), torch.ones(2, 3, dtype=torch.bool), 1
        ),
        "mask",
    ),
    (
        "rel_heads",
        lambda: relation_kl_loss(
            torch.zeros(2, 4, 6), torch.zeros(2, 4, 8), torch.ones(2, 4, dtype=torch.bool), 4
        ),
        "width 6 and teacher width 8",
    ),
    (
        "rel_zero_heads",
        lambda: relation_kl_loss(
            torch.zeros(2, 4, 6), torch.zeros(2, 4, 8), torch.ones(2, 4, dtype=torch.bool), 0
        ),
        "heads",
    ),
]


@pytest.mark.parametrize(("call", "match"), [(c, m) for _, c, m in _BAD], ids=[n for n, _, _ in _BAD])
def test_bad_shapes_raise_one_line_value_error(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)) as info:
        call()
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------

_PAIR_LOSSES: dict[str, Loss] = {
    "mse": embedding_mse_loss,
    "cos": cosine_embedding_loss,
    "skl": similarity_kl_loss,
    "skl_hot": lambda s, t: similarity_kl_loss(s, t, 1.0),
    "smse": similarity_mse_loss,
}
_RELATIONAL = ("skl", "skl_hot", "smse")  # compare batch geometry: widths may differ


@PROPS
@given(st.sampled_from(sorted(_PAIR_LOSSES)), st.integers(2, 7), st.integers(1, 6), SEEDS)
def test_pair_losses_zero_on_equal_and_nonnegative(name: str, b: int, d: int, seed: int) -> None:
    fn = _PAIR_LOSSES[name]
    t = _randn(b, d, seed=seed, scale=3.0)
    same = fn(t.clone(), t)
    assert same.shape == (b,) and same.abs().max() < 1e-12
    s = _randn(b, d + (2 if name in _RELATIONAL else 0), seed=seed + 1)
    assert (fn(s, t) >= 0).all()


@PROPS
@given(
    st.sampled_from(["cos", "skl", "skl_hot", "smse"]),
    st.integers(2, 6),
    st.integers(1, 5),
    SEEDS,
    st.lists(st.floats(1e-3, 1e3), min_size=12, max_size=12),
)
def test_direction_losses_invariant_to_positive_row_scaling(
    name: str, b: int, d: int, seed: int, scales: list[float]
) -> None:
    fn = _PAIR_LOSSES[name]
    s, t = _randn(b, d, seed=seed), _randn(b, d, seed=seed + 1)
    a, c = _t(scales[:b]).unsqueeze(1), _t(scales[6 : 6 + b]).unsqueeze(1)
    torch.testing.assert_close(fn(s * a, t * c), fn(s, t), atol=1e-10, rtol=1e-9)


@PROPS
@given(st.integers(1, 4), st.integers(1, 6), st.sampled_from([1, 2, 3]), st.integers(1, 3), SEEDS)
def test_relation_kl_zero_nonnegative_and_blind_to_padding(
    b: int, n: int, heads: int, width: int, seed: int
) -> None:
    ds, dt = heads * width, heads * (width + 1)
    s, t = _randn(b, n, ds, seed=seed), _randn(b, n, dt, seed=seed + 1, scale=2.0)
    mask = _mask(b, n, seed + 2)
    assert relation_kl_loss(t.clone(), t, mask, heads).abs().max() < 1e-12
    base = relation_kl_loss(s, t, mask, heads)
    assert base.shape == (b,) and (base >= 0).all()
    pad = ~mask.unsqueeze(-1)
    s2 = torch.where(pad, _randn(b, n, ds, seed=seed + 3, scale=50.0), s).requires_grad_(True)
    t2 = torch.where(pad, _randn(b, n, dt, seed=seed + 4, scale=50.0), t)
    again = relation_kl_loss(s2, t2, mask, heads)
    torch.testing.assert_close(again, base, atol=1e-12, rtol=0)
    again.sum().backward()
    assert s2.grad is not None and (s2.grad.masked_select(pad) == 0).all()


def test_relation_kl_ignores_nonfinite_padding_and_empty_samples() -> None:
    s, t = _randn(3, 4, 6, seed=20), _randn(3, 4, 4, seed=21)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    base = relation_kl_loss(s, t, mask, 2)
    assert base[1] == 0
    s_bad = s.masked_fill(~mask.unsqueeze(-1), math.nan).requires_grad_(True)
    t_bad = t.masked_fill(~mask.unsqueeze(-1), math.inf)
    got = relation_kl_loss(s_bad, t_bad, mask, 2)
    torch.testing.assert_close(got, base, atol=0, rtol=0)
    got.sum().backward()
    assert s_bad.grad is not None and torch.isfinite(s_bad.grad).all()


_ALL: dict[str, Loss] = {
    **_PAIR_LOSSES,
    "rel": lambda s, t: relation_kl_loss(
        s.view(2, -1, s.shape[1]), t.view(2, -1, t.shape[1]), _mask(2, s.shape[0] // 2, 0), 2
    ),
}


@PROPS
@given(st.sampled_from(sorted(_ALL)), st.integers(1, 4), SEEDS)
def test_float32_matches_float64(name: str, half_b: int, seed: int) -> None:
    fn = _ALL[name]
    s, t = _randn(2 * half_b, 6, seed=seed), _randn(2 * half_b, 6, seed=seed + 1, scale=2.0)
    want = fn(s, t)
    got = fn(s.float(), t.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    low = fn(s.bfloat16(), t.bfloat16())
    assert low.dtype == torch.float32 and torch.isfinite(low).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(_ALL))
def test_finite_gradients_for_duplicates_zeros_and_large_values(name: str, dtype: torch.dtype) -> None:
    big = ((torch.randint(0, 2, (4, 6), generator=torch.Generator().manual_seed(30)) * 2 - 1) * 1e4).to(dtype)
    emb = torch.cat([big[:2], big[:1], torch.zeros(1, 6, dtype=dtype)])  # a duplicate row and a zero row
    for student, teacher in [(emb, big), (emb, emb), (big, emb), (torch.zeros_like(emb), emb)]:
        s = student.clone().requires_grad_(True)
        tt = teacher.clone().requires_grad_(True)  # the loss must not detach the teacher either
        loss = _ALL[name](s, tt)
        assert torch.isfinite(loss).all() and (loss >= 0).all(), loss
        loss.sum().backward()
        for g in (s.grad, tt.grad):
            assert g is not None and torch.isfinite(g).all(), g


def test_teacher_gradient_flows_and_student_gets_it() -> None:
    s, t = _randn(4, 5, seed=40).requires_grad_(True), _randn(4, 3, seed=41).requires_grad_(True)
    similarity_kl_loss(s, t).sum().backward()
    assert s.grad is not None and t.grad is not None and t.grad.abs().sum() > 0 and s.grad.abs().sum() > 0
