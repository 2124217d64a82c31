"""Feature and embedding losses: naive float64 references (explicit loops), invariances, memory bank."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses.features import (
    MemoryBank,
    attention_map,
    attention_transfer_loss,
    crd_loss,
    fitnet_loss,
    nd_loss,
    ofa_loss,
    pkt_loss,
    rkd_loss,
)

PROPS = settings(max_examples=50, deadline=None)
F64 = torch.float64


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (_norm(a) * _norm(b))


def _smooth_l1(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    top = max(row)
    e = [math.exp((x - top) / t) for x in row]
    return [x / sum(e) for x in e]


# ----------------------------------------------------------------------------------------------------
# FitNets and attention transfer
# ----------------------------------------------------------------------------------------------------


def test_fitnet_golden() -> None:
    s, t = _randn(3, 4, 2, 2, seed=1), _randn(3, 4, 2, 2, seed=2)
    want = [
        sum((a - b) ** 2 for a, b in zip(x.flatten().tolist(), y.flatten().tolist(), strict=True))
        for x, y in zip(s, t, strict=True)
    ]
    torch.testing.assert_close(fitnet_loss(s, t), torch.tensor(want, dtype=F64), atol=1e-12, rtol=1e-12)
    assert fitnet_loss(t, t).abs().max() == 0
    with pytest.raises(ValueError, match="shapes differ"):
        fitnet_loss(s, t[:, :3])


def naive_attention(feat: torch.Tensor, p: float) -> list[list[float]]:
    """(B, C, H, W) -> per sample [mean_c |f|^p for each (h, w)] normalised, looping over everything."""
    b, c, h, w = feat.shape
    out = []
    for i in range(b):
        row = [
            sum(abs(feat[i, k, y, x].item()) ** p for k in range(c)) / c for y in range(h) for x in range(w)
        ]
        n = _norm(row)
        out.append([v / n for v in row])
    return out


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_attention_map_golden_and_token_layout(p: float) -> None:
    f = _randn(2, 5, 3, 4, seed=3)
    got = attention_map(f, p)
    torch.testing.assert_close(got, torch.tensor(naive_attention(f, p), dtype=F64), atol=1e-12, rtol=1e-10)
    tokens = f.flatten(2).transpose(1, 2)  # (B, N = H*W, D = C)
    torch.testing.assert_close(attention_map(tokens, p), got, atol=1e-14, rtol=0)


def test_attention_transfer_golden_same_size() -> None:
    s, t = _randn(2, 3, 4, 4, seed=4), _randn(2, 7, 4, 4, seed=5)  # channel counts may differ
    ms, mt = naive_attention(s, 2), naive_attention(t, 2)
    want = [sum((a - b) ** 2 for a, b in zip(x, y, strict=True)) for x, y in zip(ms, mt, strict=True)]
    torch.testing.assert_close(
        attention_transfer_loss(s, t), torch.tensor(want, dtype=F64), atol=1e-12, rtol=1e-10
    )
    assert attention_transfer_loss(t, t).abs().max() < 1e-14


def test_attention_transfer_pools_the_larger_map() -> None:
    s, t = _randn(2, 3, 8, 6, seed=6), _randn(2, 4, 4, 3, seed=7)
    # naive: energy of the 8x6 student, averaged over 2x2 blocks, then normalised
    energy = [
        [[sum(s[i, k, y, x].item() ** 2 for k in range(3)) / 3 for x in range(6)] for y in range(8)]
        for i in range(2)
    ]
    want = []
    for i in range(2):
        pooled = [
            sum(energy[i][2 * y + dy][2 * x + dx] for dy in (0, 1) for dx in (0, 1)) / 4
            for y in range(4)
            for x in range(3)
        ]
        ps = [v / _norm(pooled) for v in pooled]
        pt = naive_attention(t, 2)[i]
        want.append(sum((a - b) ** 2 for a, b in zip(ps, pt, strict=True)))
    torch.testing.assert_close(
        attention_transfer_loss(s, t), torch.tensor(want, dtype=F64), atol=1e-12, rtol=1e-10
    )
    torch.testing.assert_close(
        attention_transfer_loss(t, s), torch.tensor(want, dtype=F64), atol=1e-12, rtol=1e-10
    )
    # token features: 8 tokens pooled pairwise down to 4
    ts, tt = _randn(2, 8, 5, seed=8), _randn(2, 4, 3, seed=9)
    e = (ts**2).mean(dim=2)
    halved = torch.stack([(e[:, 2 * j] + e[:, 2 * j + 1]) / 2 for j in range(4)], dim=1)
    ref = ((halved / halved.norm(dim=1, keepdim=True) - attention_map(tt)) ** 2).sum(dim=1)
    torch.testing.assert_close(attention_transfer_loss(ts, tt), ref, atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------------------------------
# RKD
# ----------------------------------------------------------------------------------------------------


def naive_rkd(s: torch.Tensor, t: torch.Tensor, wd: float, wa: float) -> float:
    es, et = s.flatten(1).tolist(), t.flatten(1).tolist()
    b = len(es)

    def dist(e: list[list[float]], i: int, j: int) -> float:
        return _norm([x - y for x, y in zip(e[i], e[j], strict=True)])

    pairs = [(i, j) for i in range(b) for j in range(b) if i != j]
    mean_s = sum(dist(es, i, j) for i, j in pairs) / len(pairs)
    mean_t = sum(dist(et, i, j) for i, j in pairs) / len(pairs)
    l_dist = sum(_smooth_l1(dist(es, i, j) / mean_s, dist(et, i, j) / mean_t) for i, j in pairs) / len(pairs)

    def cos_at(e: list[list[float]], i: int, j: int, k: int) -> float:
        u = [x - y for x, y in zip(e[i], e[j], strict=True)]
        v = [x - y for x, y in zip(e[k], e[j], strict=True)]
        return _cos(u, v)

    triplets = [(i, j, k) for i in range(b) for j in range(b) for k in range(b) if i != j and k != j]
    l_angle = sum(_smooth_l1(cos_at(es, i, j, k), cos_at(et, i, j, k)) for i, j, k in triplets) / len(
        triplets
    )
    return wd * l_dist + wa * l_angle


@pytest.mark.parametrize(("wd", "wa"), [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0)])
def test_rkd_golden(wd: float, wa: float) -> None:
    s, t = _randn(5, 2, 3, seed=10, scale=0.3), _randn(5, 4, seed=11, scale=2.0)  # dims differ; flattened
    assert abs(rkd_loss(s, t, wd, wa).item() - naive_rkd(s, t, wd, wa)) < 1e-10


@PROPS
@given(st.integers(2, 7), st.integers(1, 6), st.integers(0, 2**31 - 1), st.floats(0.01, 100.0))
def test_rkd_zero_under_scaling_and_isometry(b: int, d: int, seed: int, scale: float) -> None:
    t = _randn(b, d, seed=seed)
    assert abs(rkd_loss(t * scale, t).item()) < 1e-9
    q, _ = torch.linalg.qr(_randn(d + 3, d + 3, seed=seed + 1))  # rows of q[:d] are orthonormal
    assert abs(rkd_loss(scale * t @ q[:d], t).item()) < 1e-9
    assert rkd_loss(_randn(b, d + 1, seed=seed + 2), t).item() >= 0


# ----------------------------------------------------------------------------------------------------
# PKT
# ----------------------------------------------------------------------------------------------------


def naive_pkt(s: torch.Tensor, t: torch.Tensor, eps: float) -> float:
    def probs(e: list[list[float]]) -> list[list[float]]:
        rows = []
        for a in e:
            k = [(_cos(a, b) + 1) / 2 + eps for b in e]
            rows.append([v / sum(k) for v in k])
        return rows

    ps, pt = probs(s.flatten(1).tolist()), probs(t.flatten(1).tolist())
    return sum(
        sum(p * math.log(p / q) for p, q in zip(rt, rs, strict=True)) for rt, rs in zip(pt, ps, strict=True)
    ) / len(ps)


@pytest.mark.parametrize("eps", [1e-7, 0.1])
def test_pkt_golden(eps: float) -> None:
    s, t = _randn(6, 3, seed=12), _randn(6, 8, seed=13)
    assert abs(pkt_loss(s, t, eps).item() - naive_pkt(s, t, eps)) < 1e-12


@PROPS
@given(st.integers(1, 7), st.integers(1, 6), st.integers(0, 2**31 - 1), st.floats(0.01, 100.0))
def test_pkt_nonnegative_and_zero_on_scaled_copy(b: int, d: int, seed: int, scale: float) -> None:
    s, t = _randn(b, d, seed=seed), _randn(b, d + 2, seed=seed + 1)
    assert pkt_loss(s, t).item() >= -1e-12
    assert abs(pkt_loss(t * scale, t).item()) < 1e-12
    antipodal = torch.cat([s[:1], -s[:1]])  # cos = -1 gives kernel eps, not 0
    assert math.isfinite(pkt_loss(antipodal, antipodal.flip(0)).item())


# ----------------------------------------------------------------------------------------------------
# CRD and the memory bank
# ----------------------------------------------------------------------------------------------------


def naive_crd(s: torch.Tensor, t: torch.Tensor, tau: float, neg: torch.Tensor | None) -> float:
    es, et = s.tolist(), t.tolist()
    extra = neg.tolist() if neg is not None else []
    total = 0.0
    for i, a in enumerate(es):
        scores = [_cos(a, b) / tau for b in et + extra]
        total += -scores[i] + math.log(sum(math.exp(x) for x in scores))
    return total / len(es)


@pytest.mark.parametrize("tau", [0.07, 0.5])
@pytest.mark.parametrize("with_negatives", [False, True])
def test_crd_golden(tau: float, with_negatives: bool) -> None:
    s, t = _randn(5, 6, seed=14), _randn(5, 6, seed=15, scale=3.0)
    neg = _randn(7, 6, seed=16) if with_negatives else None
    assert abs(crd_loss(s, t, tau, neg).item() - naive_crd(s, t, tau, neg)) < 1e-10
    with pytest.raises(ValueError, match="dims differ"):
        crd_loss(s, t[:, :4])


@PROPS
@given(st.integers(1, 6), st.lists(st.integers(0, 9), max_size=12))
def test_memory_bank_is_bounded_fifo(size: int, pushes: list[int]) -> None:
    bank = MemoryBank(size, 3, dtype=F64)
    history: list[list[float]] = []
    counter = 0
    for n in pushes:
        rows = torch.arange(counter, counter + n, dtype=F64).unsqueeze(1).repeat(1, 3)
        counter += n
        bank.push(rows)
        history.extend(rows.tolist())
        assert len(bank) == min(len(history), size) <= size
        negs = bank.negatives()
        assert negs.shape == (len(bank), 3)
        assert negs.tolist() == history[len(history) - len(bank) :]  # the newest, oldest first


def test_memory_bank_resume_is_exact_and_negatives_survive_push() -> None:
    a = MemoryBank(5, 4)
    for k in range(3):
        a.push(_randn(3, 4, seed=20 + k))
    state = a.state_dict()
    assert set(state) == {"bank", "ptr", "count"}
    b = MemoryBank(5, 4)
    b.load_state_dict(state)
    for k in range(2):
        a.push(_randn(2, 4, seed=30 + k))
        b.push(_randn(2, 4, seed=30 + k))
    assert torch.equal(a.negatives(), b.negatives())
    # a push between forward and backward must not invalidate the saved negatives
    s = _randn(4, 4, seed=40).requires_grad_(True)
    t = _randn(4, 4, seed=41)
    loss = crd_loss(s, t, 0.1, a.negatives())
    a.push(t)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="dim"):
        a.push(torch.zeros(2, 3))


# ----------------------------------------------------------------------------------------------------
# ND and OFA
# ----------------------------------------------------------------------------------------------------


def test_nd_golden_and_zero_cases() -> None:
    s, t = _randn(4, 5, seed=50), _randn(4, 5, seed=51, scale=2.0)
    means = _randn(3, 5, seed=52)
    y = torch.tensor([0, 2, 1, 2])
    want = []
    for i in range(4):
        c = means[y[i]].tolist()
        direction = 1 - _cos(s[i].tolist(), c)
        hinge = max(0.0, _norm(t[i].tolist()) - _norm(s[i].tolist()))
        want.append(0.7 * direction + 1.3 * hinge)
    got = nd_loss(s, t, means, y, norm_weight=1.3, direction_weight=0.7)
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), atol=1e-12, rtol=1e-10)
    aligned = means[y] * (t.norm(dim=1) / means[y].norm(dim=1) * 1.5).unsqueeze(1)  # along c, longer than t
    assert nd_loss(aligned, t, means, y).abs().max() < 1e-12


def naive_ofa(s: torch.Tensor, t: torch.Tensor, y: list[int], temp: float, gamma: float) -> list[float]:
    out = []
    for i, (a, b) in enumerate(zip(s.tolist(), t.tolist(), strict=True)):
        ps, pt = _softmax(a, temp), _softmax(b, temp)
        loss = -((1 + pt[y[i]]) ** gamma) * math.log(ps[y[i]])
        loss -= sum(pt[c] * math.log(ps[c]) for c in range(len(a)) if c != y[i])
        out.append(loss)
    return out


@pytest.mark.parametrize(("temp", "gamma"), [(1.0, 1.0), (2.0, 0.0), (1.0, 1.7), (4.0, 3.0)])
def test_ofa_golden(temp: float, gamma: float) -> None:
    s, t = _randn(6, 7, seed=60, scale=3.0), _randn(6, 7, seed=61, scale=3.0)
    y = torch.tensor([0, 1, 2, 6, 5, 0])
    want = torch.tensor(naive_ofa(s, t, y.tolist(), temp, gamma), dtype=F64)
    torch.testing.assert_close(ofa_loss(s, t, y, temp, gamma), want, atol=1e-10, rtol=1e-10)


@PROPS
@given(st.integers(1, 6), st.integers(2, 9), st.integers(0, 2**31 - 1), st.floats(0.3, 5.0))
def test_ofa_reductions(b: int, c: int, seed: int, temp: float) -> None:
    s, t = _randn(b, c, seed=seed, scale=3.0), _randn(b, c, seed=seed + 1, scale=3.0)
    y = torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(seed))
    log_ps = torch.log_softmax(s / temp, dim=-1)
    p_t = torch.softmax(t / temp, dim=-1)
    soft_ce = -(p_t * log_ps).sum(dim=-1)
    hard_ce = -log_ps.gather(1, y.unsqueeze(1)).squeeze(1)
    # exponent 1: hard-label CE + soft CE with the teacher
    torch.testing.assert_close(ofa_loss(s, t, y, temp, 1.0), hard_ce + soft_ce, atol=1e-10, rtol=1e-10)
    # exponent 0: soft CE with the teacher distribution whose target entry is replaced by 1
    target_one = p_t.scatter(1, y.unsqueeze(1), 1.0)
    torch.testing.assert_close(
        ofa_loss(s, t, y, temp, 0.0), -(target_one * log_ps).sum(dim=-1), atol=1e-10, rtol=1e-10
    )
    # a larger exponent never lowers the loss (target weight (1 + p)^g grows with g; -log p_s >= 0)
    assert (ofa_loss(s, t, y, temp, 2.0) >= ofa_loss(s, t, y, temp, 1.0) - 1e-12).all()


# ----------------------------------------------------------------------------------------------------
# Stability: extreme values, duplicates and zero vectors give finite values and gradients
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["fitnet", "at", "at_tokens", "rkd", "pkt", "crd", "nd", "ofa"])
def test_finite_gradients_in_degenerate_cases(name: str, dtype: torch.dtype) -> None:
    big = ((torch.randint(0, 2, (4, 6), generator=torch.Generator().manual_seed(70)) * 2 - 1) * 1e4).to(dtype)
    emb = torch.cat([big[:2], big[:1], torch.zeros(1, 6, dtype=dtype)])  # a duplicate row and a zero row
    s = (emb if name in ("rkd", "pkt", "crd", "nd") else big).clone().requires_grad_(True)
    y = torch.tensor([0, 1, 5, 2])
    fns = {
        "fitnet": lambda: fitnet_loss(s, -big),
        "at": lambda: attention_transfer_loss(s.view(4, 1, 2, 3), big.view(4, 2, 1, 3)),
        "at_tokens": lambda: attention_transfer_loss(s.view(4, 3, 2) * 0, big.view(4, 2, 3)),
        "rkd": lambda: rkd_loss(s, big),
        "pkt": lambda: pkt_loss(s, big),
        "crd": lambda: crd_loss(s, big, 0.07, big.flip(0)),
        "nd": lambda: nd_loss(s, big, torch.cat([big, torch.zeros(2, 6, dtype=dtype)]), y),
        "ofa": lambda: ofa_loss(s, -big, y, 1.0, 2.0) + ofa_loss(s, big, y, 4.0, 0.0),
    }
    loss = fns[name]()
    assert torch.isfinite(loss).all(), loss
    loss.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all(), s.grad
