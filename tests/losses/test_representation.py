"""Representation losses for causal LMs: naive float64 references (explicit loops), masking, checkpointing."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses.representation import (
    HIDDEN_LOSSES,
    HiddenLoss,
    expand_kv,
    hidden_state_loss,
    relation_kl,
    relation_kl_checkpointed,
)

PROPS = settings(max_examples=25, deadline=None)
F64 = torch.float64
SEEDS = st.integers(0, 2**31 - 1)
Rows = list[list[float]]
Relation = Callable[..., torch.Tensor]
RELATIONS: dict[str, Relation] = {"plain": relation_kl, "checkpointed": relation_kl_checkpointed}


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def _bits(b: int, n: int, seed: int, p: float = 0.6) -> torch.Tensor:
    return torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) < p


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(x - top) for x in row]
    return [x / sum(e) for x in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


# ----------------------------------------------------------------------------------------------------
# Naive references
# ----------------------------------------------------------------------------------------------------


def naive_hidden(s: torch.Tensor, t: torch.Tensor, kind: str) -> list[float]:
    out = []
    for a, b in zip(s.tolist(), t.tolist(), strict=True):
        d = len(a)
        if kind == "mse":
            out.append(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / d)
        elif kind == "cosine":
            out.append(1 - _dot(a, b) / math.sqrt(_dot(a, a) * _dot(b, b)))
        else:
            rms = math.sqrt(_dot(b, b) / d)
            out.append(sum(((x - y) / rms) ** 2 for x, y in zip(a, b, strict=True)) / d)
    return out


def naive_expand(x: torch.Tensor, num_heads: int, num_kv_heads: int) -> list[Rows]:
    """Query head ``h`` reads key/value head ``h // (num_heads // num_kv_heads)``."""
    d, group = x.shape[2] // num_kv_heads, num_heads // num_kv_heads
    heads = [(h // group) * d for h in range(num_heads)]  # where each query head's slice starts
    return [[[v for start in heads for v in row[start : start + d]] for row in seq] for seq in x.tolist()]


def naive_relation_kl(
    s_left: torch.Tensor | list[Rows],
    s_right: torch.Tensor | list[Rows],
    t_left: torch.Tensor | list[Rows],
    t_right: torch.Tensor | list[Rows],
    key_mask: torch.Tensor,
    query_mask: torch.Tensor,
    heads: int,
    causal: bool,
) -> float:
    sl, sr, tl, tr = (
        x.tolist() if isinstance(x, torch.Tensor) else x for x in (s_left, s_right, t_left, t_right)
    )
    b, n = key_mask.shape

    def row(left: Rows, right: Rows, h: int, i: int, keys: list[int]) -> list[float]:
        dh = len(left[0]) // heads
        li = left[i][h * dh : (h + 1) * dh]
        return _softmax([_dot(li, right[j][h * dh : (h + 1) * dh]) / math.sqrt(dh) for j in keys])

    total = 0.0
    for k in range(b):
        for h in range(heads):
            for i in range(n):
                if not (query_mask[k, i] and key_mask[k, i]):
                    continue
                keys = [j for j in range(n) if key_mask[k, j] and (j <= i or not causal)]
                p = row(tl[k], tr[k], h, i, keys)
                q = row(sl[k], sr[k], h, i, keys)
                total += _kl(p, q) / heads
    return total


# ----------------------------------------------------------------------------------------------------
# Golden tests
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", HIDDEN_LOSSES)
def test_hidden_state_loss_golden(kind: HiddenLoss) -> None:
    s, t = _randn(5, 7, seed=1), _randn(5, 7, seed=2, scale=3.0)
    got = hidden_state_loss(s, t, kind)
    assert got.dtype == F64 and got.shape == (5,)
    torch.testing.assert_close(got, torch.tensor(naive_hidden(s, t, kind), dtype=F64), atol=1e-10, rtol=0)


def test_expand_kv_golden() -> None:
    x = _randn(2, 3, 6, seed=3)  # 3 kv heads of width 2
    assert expand_kv(x, 3, 3) is x
    for heads in (6, 9):
        got = expand_kv(x, heads, 3)
        assert got.shape == (2, 3, 2 * heads)
        assert got.tolist() == naive_expand(x, heads, 3)


def _rows(text: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in word] for word in text.split()])


KEY_MASK = _rows("11111 11100 00111 10101")  # no padding, right padding, left padding, holes
QUERY_MASKS = {"all": _rows("11111 " * 4), "answer": _rows("00111 01111 11011 00111")}


@pytest.mark.parametrize("fn", sorted(RELATIONS))
@pytest.mark.parametrize("query", sorted(QUERY_MASKS))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [1, 2, 3])
def test_relation_kl_golden_gqa_widths_padding(fn: str, query: str, causal: bool, heads: int) -> None:
    """Student: 3 attention heads of width 2, no GQA (D = 6). Teacher: 6 query heads of width 2 sharing 2
    key/value heads (D = 12). Attention relation (queries x expanded keys) and value self-relation."""
    qmask = QUERY_MASKS[query]
    sq, sk, sv = (_randn(4, 5, 6, seed=10 + i) for i in range(3))
    tq = _randn(4, 5, 12, seed=20, scale=2.0)
    tk, tv = _randn(4, 5, 4, seed=21, scale=2.0), _randn(4, 5, 4, seed=22)
    tk_full, tv_full = naive_expand(tk, 6, 2), naive_expand(tv, 6, 2)
    relation = RELATIONS[fn]

    got = relation(sq, sk, tq, expand_kv(tk, 6, 2), KEY_MASK, qmask, heads, causal=causal)
    want = naive_relation_kl(sq, sk, tq, tk_full, KEY_MASK, qmask, heads, causal)
    assert got.dim() == 0 and got.dtype == F64 and want > 0
    assert abs(got.item() - want) < 1e-10, (got.item(), want)

    tv_x = expand_kv(tv, 6, 2)
    got = relation(sv, sv, tv_x, tv_x, KEY_MASK.long(), qmask.long(), heads, causal=causal)  # int masks
    want = naive_relation_kl(sv, sv, tv_full, tv_full, KEY_MASK, qmask, heads, causal)
    assert abs(got.item() - want) < 1e-10, (got.item(), want)


@pytest.mark.parametrize("fn", sorted(RELATIONS))
def test_relation_kl_float32_matches_reference_within_1e6(fn: str) -> None:
    s, t = _randn(4, 5, 6, seed=30), _randn(4, 5, 9, seed=31)
    got = RELATIONS[fn](s.float(), s.float(), t.float(), t.float(), KEY_MASK, QUERY_MASKS["all"], 3)
    want = naive_relation_kl(s, s, t, t, KEY_MASK, QUERY_MASKS["all"], 3, True)
    assert got.dtype == torch.float32
    assert abs(got.item() - want) <= 1e-6 * max(1.0, abs(want)), (got.item(), want)
    low = RELATIONS[fn](s.bfloat16(), s.bfloat16(), t.bfloat16(), t.bfloat16(), KEY_MASK, KEY_MASK, 3)
    assert low.dtype == torch.float32 and torch.isfinite(low)


def test_relation_kl_default_is_causal_and_noncausal_sees_the_future() -> None:
    s, t = _randn(1, 4, 2, seed=32), _randn(1, 4, 2, seed=33)
    first = torch.tensor([[True, False, False, False]])
    keys = torch.ones(1, 4, dtype=torch.bool)
    # causally, row 0 sees only itself: a one-point distribution on both sides, KL 0
    assert relation_kl(s, s, t, t, keys, first, 1) == 0
    assert relation_kl(s, s, t, t, keys, first, 1, causal=False) > 0


# ----------------------------------------------------------------------------------------------------
# Bad arguments: ValueError naming the function, one line
# ----------------------------------------------------------------------------------------------------

_Z = torch.zeros
_M, _S2 = torch.ones(2, 4, dtype=torch.bool), (2, 4, 2)
_BAD: list[tuple[str, Callable[[], object], str]] = [
    ("hid_shape", lambda: hidden_state_loss(_Z(2, 3), _Z(2, 4), "mse"), "hidden_state_loss: expected two"),
    ("hid_rank", lambda: hidden_state_loss(_Z(2, 3, 1), _Z(2, 3, 1), "cosine"), "hidden_state_loss"),
    ("hid_kind", lambda: hidden_state_loss(_Z(2, 3), _Z(2, 3), "l1"), "hidden_state_loss: kind"),  # type: ignore[arg-type]
    ("kv_groups", lambda: expand_kv(_Z(1, 2, 8), 6, 4), "expand_kv: num_heads=6"),
    ("kv_width", lambda: expand_kv(_Z(1, 2, 7), 4, 2), "expand_kv: expected (B, T, num_kv_heads * d)"),
    ("kv_rank", lambda: expand_kv(_Z(2, 8), 4, 2), "expand_kv"),
    ("kv_zero", lambda: expand_kv(_Z(1, 2, 8), 4, 0), "expand_kv: num_kv_heads"),
]
# name, shapes of (student left, student right, teacher left, teacher right), key mask, query mask, heads, message
_REL_BAD: list[tuple[str, list[tuple[int, ...]], torch.Tensor, torch.Tensor, int, str]] = [
    ("rank", [(2, 4), (2, 4), _S2, _S2], _M, _M, 2, "student left and right must be (B, T, D)"),
    ("lr", [_S2, (2, 4, 4), _S2, _S2], _M, _M, 2, "student left and right"),
    ("teacher", [_S2, _S2, _S2, (2, 4, 6)], _M, _M, 2, "teacher left and right"),
    ("len", [_S2, _S2, (2, 5, 2), (2, 5, 2)], _M, _M, 2, "student and teacher must share (B, T)"),
    ("keys", [_S2] * 4, _M[:, :3], _M, 2, "key_mask must be (B, T) = (2, 4), got (2, 3)"),
    ("queries", [_S2] * 4, _M, _M[:1], 2, "query_mask must be (B, T) = (2, 4), got (1, 4)"),
    ("heads", [(2, 4, 4), (2, 4, 4), (2, 4, 6), (2, 4, 6)], _M, _M, 4, "student width 4 and teacher width 6"),
    ("zero", [_S2] * 4, _M, _M, 0, "heads must be an int >= 1"),
]


def _rel_call(
    fn: Relation, shapes: list[tuple[int, ...]], k: torch.Tensor, q: torch.Tensor, h: int
) -> Callable[[], object]:
    return lambda: fn(*(_Z(*x) for x in shapes), k, q, h)


for _fn in RELATIONS.values():
    for _n, _shapes, _k, _q, _h, _m in _REL_BAD:
        _BAD.append((f"{_fn.__name__}_{_n}", _rel_call(_fn, _shapes, _k, _q, _h), f"{_fn.__name__}: {_m}"))


@pytest.mark.parametrize(("call", "match"), [(c, m) for _, c, m in _BAD], ids=[n for n, _, _ in _BAD])
def test_bad_arguments_raise_one_line_value_error(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)) as info:
        call()
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------


@PROPS
@given(st.sampled_from(HIDDEN_LOSSES), st.integers(1, 6), st.integers(1, 8), SEEDS, st.floats(1e-3, 1e3))
def test_hidden_state_loss_zero_nonnegative_and_scaling(
    kind: HiddenLoss, n: int, d: int, seed: int, c: float
) -> None:
    t = _randn(n, d, seed=seed, scale=3.0)
    assert hidden_state_loss(t.clone(), t, kind).abs().max() < 1e-12
    s = _randn(n, d, seed=seed + 1)
    base = hidden_state_loss(s, t, kind)
    assert base.shape == (n,) and (base >= 0).all()
    if kind == "cosine":  # direction only: a positively scaled teacher is matched exactly
        assert hidden_state_loss(c * t, t, kind).abs().max() < 1e-12
    if kind == "normalized_mse":  # blind to the common scale of both rows (e.g. deeper layers' magnitudes)
        torch.testing.assert_close(hidden_state_loss(c * s, c * t, kind), base, atol=1e-10, rtol=1e-9)
    if kind == "mse":
        torch.testing.assert_close(hidden_state_loss(c * s, c * t, kind), c * c * base, atol=1e-10, rtol=1e-9)


def test_hidden_state_loss_upcasts_and_survives_zero_rows() -> None:
    s, t = _randn(3, 4, seed=40), _randn(3, 4, seed=41)
    t[1] = 0.0
    for kind in HIDDEN_LOSSES:
        ss = s.bfloat16().requires_grad_(True)
        out = hidden_state_loss(ss, t.bfloat16(), kind)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        out.sum().backward()
        assert ss.grad is not None and torch.isfinite(ss.grad.float()).all()


def _case(b: int, n: int, heads: int, ws: int, wt: int, seed: int, self_rel: bool) -> list[torch.Tensor]:
    sl, tl = _randn(b, n, heads * ws, seed=seed), _randn(b, n, heads * wt, seed=seed + 1, scale=2.0)
    sr = sl if self_rel else _randn(b, n, heads * ws, seed=seed + 2)
    tr = tl if self_rel else _randn(b, n, heads * wt, seed=seed + 3, scale=2.0)
    return [sl, sr, tl, tr]


REL_ARGS = (
    st.sampled_from(sorted(RELATIONS)),
    st.integers(1, 3),  # B
    st.integers(1, 6),  # T
    st.sampled_from([1, 2, 3]),  # heads
    st.integers(1, 3),  # student head width
    st.integers(1, 3),  # teacher head width
    st.booleans(),  # causal
    st.booleans(),  # self relation
    SEEDS,
)


@PROPS
@given(*REL_ARGS)
def test_relation_kl_zero_on_equal_nonnegative_and_blind_to_padding(
    fn: str, b: int, n: int, heads: int, ws: int, wt: int, causal: bool, self_rel: bool, seed: int
) -> None:
    relation = RELATIONS[fn]
    sl, sr, tl, tr = _case(b, n, heads, ws, wt, seed, self_rel)
    keys, queries = _bits(b, n, seed + 4), _bits(b, n, seed + 5)
    assert relation(tl.clone(), tr.clone(), tl, tr, keys, queries, heads, causal=causal).abs() < 1e-12
    base = relation(sl, sr, tl, tr, keys, queries, heads, causal=causal)
    assert base >= 0
    want = naive_relation_kl(sl, sr, tl, tr, keys, queries, heads, causal)
    assert abs(base.item() - want) < 1e-9

    pad = ~keys.unsqueeze(-1)
    fills = (math.nan, math.inf, -math.inf, math.nan)
    leaves = [
        x.masked_fill(pad, v).requires_grad_(True) for x, v in zip((sl, sr, tl, tr), fills, strict=True)
    ]
    if self_rel:
        leaves[1], leaves[3] = leaves[0], leaves[2]
    got = relation(*leaves, keys, queries, heads, causal=causal)
    torch.testing.assert_close(got, base, atol=1e-12, rtol=0)
    got.backward()
    for x in leaves:
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert (x.grad.masked_select(pad) == 0).all()


@PROPS
@given(*REL_ARGS, st.integers(0, 5))
def test_causal_rows_ignore_later_tokens(
    fn: str, b: int, n: int, heads: int, ws: int, wt: int, _causal: bool, self_rel: bool, seed: int, cut: int
) -> None:
    """With only rows ``<= i`` selected, anything after ``i`` (values and padding) changes nothing."""
    i = min(cut, n - 1)
    relation = RELATIONS[fn]
    first = _case(b, n, heads, ws, wt, seed, self_rel)
    other = _case(b, n, heads, ws, wt, seed + 10, self_rel)
    later = (torch.arange(n) > i).expand(b, n)
    second = [torch.where(later.unsqueeze(-1), y, x) for x, y in zip(first, other, strict=True)]
    keys = _bits(b, n, seed + 4)
    keys2 = torch.where(later, _bits(b, n, seed + 6), keys)
    queries = _bits(b, n, seed + 5) & ~later
    a = relation(*first, keys, queries, heads)
    c = relation(*second, keys2, queries, heads)
    torch.testing.assert_close(a, c, atol=1e-12, rtol=0)


@PROPS
@given(*REL_ARGS)
def test_checkpointed_matches_plain_value_and_gradient(
    _fn: str, b: int, n: int, heads: int, ws: int, wt: int, causal: bool, self_rel: bool, seed: int
) -> None:
    keys, queries = _bits(b, n, seed + 4, p=0.8), _bits(b, n, seed + 5)
    results = []
    for name in ("plain", "checkpointed"):
        relation = RELATIONS[name]
        leaves = [x.requires_grad_(True) for x in _case(b, n, heads, ws, wt, seed, False)]
        inputs = [leaves[0], leaves[0], leaves[2], leaves[2]] if self_rel else leaves
        # two "layers" summed, as a method would
        loss = relation(*inputs, keys, queries, heads, causal=causal)
        loss = loss + relation(*[x * 0.5 for x in inputs], keys, queries, heads, causal=causal)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        results.append([loss.detach(), *grads])
    for x, y in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Edge cases and memory
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", sorted(RELATIONS))
def test_left_padded_rows_and_empty_samples_are_finite_and_zero(fn: str) -> None:
    s, t = _randn(3, 4, 4, seed=50), _randn(3, 4, 6, seed=51)
    keys = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    pad_rows = ~keys  # rows with no visible key at all, selected on purpose
    s_bad = s.masked_fill(~keys.unsqueeze(-1), math.nan).requires_grad_(True)
    t_bad = t.masked_fill(~keys.unsqueeze(-1), math.inf).requires_grad_(True)
    got = RELATIONS[fn](s_bad, s_bad, t_bad, t_bad, keys, pad_rows, 2)
    assert got == 0
    got.backward()
    assert s_bad.grad is not None and (s_bad.grad == 0).all()
    assert t_bad.grad is not None and (t_bad.grad == 0).all()


def test_large_values_give_finite_gradients() -> None:
    s = (_randn(2, 5, 4, seed=60) * 1e4).requires_grad_(True)
    t = (_randn(2, 5, 4, seed=61) * 1e4).requires_grad_(True)
    keys = torch.ones(2, 5, dtype=torch.bool)
    for relation in RELATIONS.values():
        loss = relation(s.float(), s.float(), t.float(), t.float(), keys, keys, 2)
        assert torch.isfinite(loss) and loss >= 0
        gs, gt = torch.autograd.grad(loss, [s, t])
        assert torch.isfinite(gs).all() and torch.isfinite(gt).all()


def _saved_bytes(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    storages: dict[int, int] = {}
    skip = {x.untyped_storage().data_ptr() for x in exclude}

    def pack(x: torch.Tensor) -> torch.Tensor:
        ptr = x.untyped_storage().data_ptr()
        if ptr not in skip:
            storages[ptr] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn().backward()
    return sum(storages.values())


def test_checkpointed_keeps_no_relation_tensor_for_backward() -> None:
    b, n, heads = 2, 32, 4
    s = torch.randn(b, n, 16, requires_grad=True)
    t = torch.randn(b, n, 24)
    keys = torch.ones(b, n, dtype=torch.bool)
    relation_bytes = b * heads * n * n * 4
    plain = _saved_bytes(lambda: relation_kl(s, s, t, t, keys, keys, heads), [s, t])
    ckpt = _saved_bytes(lambda: relation_kl_checkpointed(s, s, t, t, keys, keys, heads), [s, t])
    assert plain >= 2 * relation_bytes  # at least the student's log-probs and the teacher's probs
    assert ckpt < relation_bytes / 4, (plain, ckpt)
