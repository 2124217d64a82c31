"""Sparse (top-k) teacher losses: k = V equals dense, naive float64 references, chunking, properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses.fused_head import chunked_head_loss
from distill.losses.sparse import SparseTopK, sparse_value_and_grad
from distill.losses.tokens import DIVERGENCES, DivergenceSpec, divergence_value_and_grad


def _topk(teacher_logits: torch.Tensor, k: int, tc: float, tail: str) -> SparseTopK:
    lp = torch.log_softmax(teacher_logits / tc, dim=-1)
    vals, ids = lp.topk(k, dim=-1)
    return SparseTopK(ids, vals, capture_temperature=tc, tail=tail)


def _logits(n: int = 6, v: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * 2, torch.randn(
        n, v, generator=g, dtype=torch.float64
    ) * 2


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize(("t", "tc"), [(1.0, 1.0), (2.0, 1.0), (0.7, 1.5)])
def test_k_equal_vocab_is_dense(name: str, tail: str, t: float, tc: float) -> None:
    s, te = _logits()
    spec = DivergenceSpec(name=name, temperature=t, beta=0.3, alpha=0.2)
    dense_v, dense_g = divergence_value_and_grad(s, te, spec)
    sparse_v, sparse_g = sparse_value_and_grad(s, _topk(te, s.shape[1], tc, tail), spec)
    torch.testing.assert_close(sparse_v, dense_v, atol=1e-9, rtol=0)
    torch.testing.assert_close(sparse_g, dense_g, atol=1e-9, rtol=0)


def _naive_categories(
    s: torch.Tensor, top: SparseTopK, t: float, tail: str
) -> tuple[list[list[float]], list[list[float]]]:
    """Teacher and student distributions over the kept categories, built with explicit loops."""
    ps, qs = [], []
    for r in range(s.shape[0]):
        ids = top.ids[r].tolist()
        q_full = [math.exp(float(x) / t) for x in s[r]]
        zq = sum(q_full)
        q_full = [x / zq for x in q_full]
        p_top = [math.exp(float(lp) * top.capture_temperature / t) for lp in top.logprobs[r]]
        q_top = [q_full[i] for i in ids]
        if tail == "bucket":
            p_tail = 1 - sum(math.exp(float(lp)) for lp in top.logprobs[r])
            p_top.append(math.exp(math.log(p_tail) * top.capture_temperature / t))
            q_top.append(1 - sum(q_top))
        zp, zq2 = sum(p_top), sum(q_top)
        ps.append([x / zp for x in p_top])
        qs.append([x / zq2 for x in q_top])
    return ps, qs


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_forward_and_reverse_kl_against_naive_float64(tail: str, t: float) -> None:
    s, te = _logits(n=5, v=13, seed=3)
    top = _topk(te, 4, 1.0, tail)
    ps, qs = _naive_categories(s, top, t, tail)
    fwd = [
        t * t * sum(p * math.log(p / q) for p, q in zip(pr, qr, strict=True))
        for pr, qr in zip(ps, qs, strict=True)
    ]
    rev = [
        t * t * sum(q * math.log(q / p) for p, q in zip(pr, qr, strict=True))
        for pr, qr in zip(ps, qs, strict=True)
    ]
    v_f, _ = sparse_value_and_grad(s, top, DivergenceSpec("forward_kl", temperature=t))
    v_r, _ = sparse_value_and_grad(s, top, DivergenceSpec("reverse_kl", temperature=t))
    torch.testing.assert_close(v_f, torch.tensor(fwd, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(v_r, torch.tensor(rev, dtype=torch.float64), atol=1e-6, rtol=0)


def _autograd_reference(s: torch.Tensor, top: SparseTopK, spec: DivergenceSpec) -> torch.Tensor:
    """Gradient of the sum of sparse values by autograd through an independent construction."""
    from distill.losses.tokens import divergence_per_token

    z = s.clone().requires_grad_(True)
    t = spec.temperature
    s_cat = z.gather(1, top.ids)
    t_cat = top.logprobs * top.capture_temperature
    if top.tail == "bucket":
        mask = torch.zeros_like(z, dtype=torch.bool).scatter(1, top.ids, True)
        s_tail = t * torch.logsumexp((z / t).masked_fill(mask, float("-inf")), dim=-1, keepdim=True)
        p_tail = (1 - top.logprobs.exp().sum(-1, keepdim=True)).log() * top.capture_temperature
        s_cat, t_cat = torch.cat([s_cat, s_tail], 1), torch.cat([t_cat, p_tail], 1)
    divergence_per_token(s_cat, t_cat, spec).sum().backward()
    assert z.grad is not None
    return z.grad


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_gradient_matches_autograd(name: str, tail: str) -> None:
    s, te = _logits(n=4, v=17, seed=5)
    top = _topk(te, 5, 1.3, tail)
    spec = DivergenceSpec(name=name, temperature=1.7, beta=0.4, alpha=0.1)
    _, grad = sparse_value_and_grad(s, top, spec)
    torch.testing.assert_close(grad, _autograd_reference(s, top, spec), atol=1e-9, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_fused_head_sparse_chunked_equals_unchunked(chunk: int) -> None:
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(20, 6, generator=g, dtype=torch.float64, requires_grad=True)
    top = _topk(torch.randn(9, 20, generator=g, dtype=torch.float64), 6, 1.0, "bucket")
    spec = DivergenceSpec("jsd", beta=0.5)
    loss, _ = chunked_head_loss(hidden, weight, teacher_topk=top, spec=spec, normalizer=9.0, chunk_size=chunk)
    loss.backward()
    ref_h, ref_w = hidden.grad.clone(), weight.grad.clone()  # type: ignore[union-attr]
    hidden.grad = weight.grad = None
    # unchunked autograd reference on full logits
    logits = hidden @ weight.T
    values, _ = sparse_value_and_grad(logits.detach(), top, spec)
    ref_loss = values.sum() / 9.0
    torch.testing.assert_close(loss.detach(), ref_loss, atol=1e-12, rtol=0)
    auto = _autograd_reference(logits.detach(), top, spec) / 9.0
    torch.testing.assert_close(ref_h, auto @ weight.detach(), atol=1e-9, rtol=0)
    torch.testing.assert_close(ref_w, auto.T @ hidden.detach(), atol=1e-9, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    k=st.integers(1, 8),
    name=st.sampled_from(["forward_kl", "reverse_kl", "jsd", "tvd"]),
    tail=st.sampled_from(["bucket", "renormalize"]),
)
def test_sparse_divergences_are_nonnegative_and_zero_at_the_teacher(
    seed: int, k: int, name: str, tail: str
) -> None:
    s, te = _logits(n=3, v=9, seed=seed)
    top = _topk(te, k, 1.0, tail)
    spec = DivergenceSpec(name=name)
    values, _ = sparse_value_and_grad(s, top, spec)
    assert bool((values >= -1e-9).all())
    same, _ = sparse_value_and_grad(te, top, spec)  # the student IS the teacher
    assert float(same.abs().max()) < 1e-9


def test_bad_ids_are_rejected() -> None:
    s, te = _logits()
    top = _topk(te, 3, 1.0, "bucket")
    bad = SparseTopK(top.ids + 100, top.logprobs)
    with pytest.raises(ValueError, match="ids"):
        sparse_value_and_grad(s, bad, DivergenceSpec())
    with pytest.raises(ValueError, match="tail"):
        SparseTopK(top.ids, top.logprobs, tail="drop")
