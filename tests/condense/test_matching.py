"""Golden tests for the matching losses (DC, DM, DataDAM) and Differentiable Siamese Augmentation."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.classifier.models import build_model
from distill.condense.dsa import DSA_OPS, DSAParams, apply_dsa, parse_strategy
from distill.condense.matching import (
    attention_maps,
    attention_matching_loss,
    class_gradients,
    distribution_matching_loss,
    final_embedding_mmd,
    gradient_distance,
    mmd_loss,
)
from distill.condense.trajectory import stateless_buffers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- DC: gradient distance


def _naive_distance(g_real: list[torch.Tensor], g_syn: list[torch.Tensor], skip_1d: bool) -> float:
    total = 0.0
    for a, b in zip(g_real, g_syn, strict=True):
        a64, b64 = a.double().numpy(), b.double().numpy()
        if a64.ndim <= 1:
            if skip_1d:
                continue
            rows_a, rows_b = [a64.ravel()], [b64.ravel()]
        else:
            rows_a = [a64[i].ravel() for i in range(a64.shape[0])]
            rows_b = [b64[i].ravel() for i in range(b64.shape[0])]
        for ra, rb in zip(rows_a, rows_b, strict=True):
            dot = sum(float(u) * float(v) for u, v in zip(ra, rb, strict=True))
            na = math.sqrt(sum(float(u) ** 2 for u in ra))
            nb = math.sqrt(sum(float(v) ** 2 for v in rb))
            total += 1.0 - dot / (na * nb + 1e-6)
    return total


@pytest.mark.parametrize("one_d", ["row", "skip"])
def test_gradient_distance_matches_naive_loop(one_d: str) -> None:
    gen = _gen(0)
    shapes = [(4, 3, 3, 3), (5, 2, 6), (7, 4), (7,), ()]
    g_real = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    g_syn = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    got = gradient_distance(g_real, g_syn, one_d=one_d)  # type: ignore[arg-type]
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_naive_distance(g_real, g_syn, one_d == "skip"), rel=1e-12, abs=1e-12)


def test_gradient_distance_extremes() -> None:
    gen = _gen(9)
    g = [
        torch.randn(6, 5, generator=gen, dtype=torch.float64),
        torch.randn(6, generator=gen, dtype=torch.float64),
    ]
    assert gradient_distance(g, g).item() == pytest.approx(0.0, abs=1e-4)  # the 1e-6 guard, not exact
    # opposite gradients: every row has cosine -1 -> 2 per row (6 weight rows + 1 bias row)
    assert gradient_distance(g, [-t for t in g]).item() == pytest.approx(14.0, abs=1e-5)
    # scale invariance per row: DC compares directions, not magnitudes
    scaled = [g[0] * torch.arange(1, 7, dtype=torch.float64)[:, None], g[1] * 3]
    assert gradient_distance(g, scaled).item() == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="shapes differ"):
        gradient_distance([torch.zeros(2, 3)], [torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="real gradients"):
        gradient_distance(g, g[:1])


def test_class_gradients_match_module_backward_and_reach_synthetic_pixels() -> None:
    torch.manual_seed(0)
    model = build_model("cnn", [1, 8, 8], 10, {"width": 4}).double()
    x = torch.randn(12, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(12) % 10
    params = dict(model.named_parameters())
    grads = class_gradients(model, params, x, y, F.cross_entropy)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for g, p in zip(grads, params.values(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)

    x_syn = torch.randn(3, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    y_syn = torch.tensor([0, 1, 2])
    bufs = stateless_buffers(model)
    before = {k: b.clone() for k, b in model.named_buffers()}
    g_real = class_gradients(model, params, x, y, F.cross_entropy, buffers=bufs)
    g_syn = class_gradients(model, params, x_syn, y_syn, F.cross_entropy, create_graph=True, buffers=bufs)
    loss = gradient_distance([g.detach() for g in g_real], g_syn)
    (gx,) = torch.autograd.grad(loss, x_syn)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0
    for k, b in model.named_buffers():  # stateless buffers: running stats untouched
        assert torch.equal(b, before[k])


# ---------------------------------------------------------------- DM and MMD


def test_distribution_matching_against_numpy() -> None:
    gen = _gen(1)
    real = torch.randn(40, 3, 2, 2, generator=gen, dtype=torch.float64)
    syn = torch.randn(5, 3, 2, 2, generator=gen, dtype=torch.float64)
    r, s = real.numpy().reshape(40, -1), syn.numpy().reshape(5, -1)
    expected = float(np.sum((r.mean(0) - s.mean(0)) ** 2))
    assert distribution_matching_loss(real, syn).item() == pytest.approx(expected, rel=1e-12)
    assert mmd_loss(real, syn).item() == pytest.approx(expected, rel=1e-12)
    assert final_embedding_mmd(real, syn).item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        distribution_matching_loss(real, syn[:, :2])


def test_rbf_mmd_against_numpy() -> None:
    gen = _gen(2)
    a = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(5, 4, generator=gen, dtype=torch.float64) + 0.5
    an, bn, sigma = a.numpy(), b.numpy(), 1.3

    def k(u: np.ndarray, v: np.ndarray) -> float:
        d = ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)
        return float(np.exp(-d / (2 * sigma**2)).mean())

    expected = k(an, an) + k(bn, bn) - 2 * k(an, bn)
    assert mmd_loss(a, b, "rbf", sigma=sigma).item() == pytest.approx(expected, rel=1e-10)
    assert mmd_loss(a, a, "rbf").item() == pytest.approx(0.0, abs=1e-12)
    assert mmd_loss(a, b, "rbf").item() > 0  # median-heuristic bandwidth
    b_req = b.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(mmd_loss(a, b_req, "rbf"), b_req)
    assert torch.isfinite(g).all()
    with pytest.raises(ValueError, match="unknown kernel"):
        mmd_loss(a, b, "poly")  # type: ignore[arg-type]


# ---------------------------------------------------------------- DataDAM


def _naive_attention(f: np.ndarray, p: float) -> np.ndarray:
    b, c = f.shape[:2]
    out = []
    for i in range(b):
        flat = f[i].reshape(c, -1)
        amap = np.array([np.mean(np.abs(flat[:, j]) ** p) for j in range(flat.shape[1])])
        out.append(amap / np.sqrt(np.sum(amap**2)))
    return np.stack(out)


def test_attention_maps_and_loss_against_naive() -> None:
    gen = _gen(3)
    real = [
        torch.randn(6, 4, 4, 4, generator=gen, dtype=torch.float64),
        torch.randn(6, 8, 2, 2, generator=gen),
    ]
    syn = [
        torch.randn(2, 4, 4, 4, generator=gen, dtype=torch.float64),
        torch.randn(2, 8, 2, 2, generator=gen),
    ]
    for f in real:
        np.testing.assert_allclose(
            attention_maps(f, 4).numpy(), _naive_attention(f.double().numpy(), 4), rtol=1e-5
        )
    expected = sum(
        float(
            np.sum(
                (
                    _naive_attention(r.double().numpy(), 4).mean(0)
                    - _naive_attention(s.double().numpy(), 4).mean(0)
                )
                ** 2
            )
        )
        for r, s in zip(real, syn, strict=True)
    )
    assert attention_matching_loss(real, syn).item() == pytest.approx(expected, rel=1e-5)
    # normalised maps: how strongly a layer fires does not matter, only where
    assert attention_matching_loss(real, [s * 5 for s in syn]).item() == pytest.approx(expected, rel=1e-4)
    assert attention_matching_loss(real, real).item() == pytest.approx(0.0, abs=1e-12)
    x = syn[0].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(attention_matching_loss(real[:1], [x], p=2), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="spatial"):
        attention_maps(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="feature shapes"):
        attention_matching_loss(real[:1], syn[1:])


# ---------------------------------------------------------------- DSA


def _images(n: int = 6, c: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, 8, 8, generator=_gen(seed), dtype=torch.float64)


@pytest.mark.parametrize("op", DSA_OPS)
def test_dsa_gradient_reaches_images(op: str) -> None:
    x = _images().requires_grad_(True)
    params = DSAParams.sample(op, 6, (8, 8), _gen(4))
    out = apply_dsa(x, params)
    assert out.shape == x.shape
    (g,) = torch.autograd.grad((out * torch.linspace(0, 1, out.numel()).view_as(out)).sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_dsa_same_params_same_transform_and_seeded() -> None:
    strategy = "color_crop_cutout_flip_scale_rotate"
    x = _images()
    p1 = DSAParams.sample(strategy, 6, (8, 8), _gen(5), one_of=False)
    p2 = DSAParams.sample(strategy, 6, (8, 8), _gen(5), one_of=False)
    assert p1.ops == tuple(strategy.split("_"))
    torch.testing.assert_close(apply_dsa(x, p1), apply_dsa(x.clone(), p1), rtol=0, atol=0)
    torch.testing.assert_close(apply_dsa(x, p1), apply_dsa(x, p2), rtol=0, atol=0)  # same seed
    p3 = DSAParams.sample(strategy, 6, (8, 8), _gen(6), one_of=False)
    assert not torch.allclose(apply_dsa(x, p1), apply_dsa(x, p3))
    # per-sample rows differ across the batch
    same = x[:1].expand(6, -1, -1, -1)
    out = apply_dsa(same, p1)
    assert not torch.allclose(out[0], out[1])


def test_dsa_batch_shared_is_siamese_across_batch_sizes() -> None:
    image = _images(1)
    params = DSAParams.sample(
        "color_crop_cutout_flip_scale_rotate", 5, (8, 8), _gen(7), batch_shared=True, one_of=False
    )
    real = apply_dsa(image.expand(5, -1, -1, -1), params)
    syn = apply_dsa(image.expand(2, -1, -1, -1), params)
    for row in [*real, *syn]:
        torch.testing.assert_close(row, real[0], rtol=0, atol=1e-12)
    per_sample = DSAParams.sample("flip", 5, (8, 8), _gen(7))
    with pytest.raises(ValueError, match="batch_shared"):
        apply_dsa(image.expand(2, -1, -1, -1), per_sample)


def test_dsa_ops_do_what_they_say() -> None:
    x = _images(4)
    base = DSAParams(ops=(), rows=4, image_size=(8, 8))
    ones = torch.ones(4, dtype=torch.float64)
    identities = [
        replace(base, ops=("scale",), scale=torch.ones(4, 2)),
        replace(base, ops=("rotate",), rotate=torch.zeros(4)),
        replace(base, ops=("crop",), translate=torch.zeros(4, 2, dtype=torch.long)),
        replace(base, ops=("color",), brightness=0 * ones, saturation=ones, contrast=ones),
    ]
    for p in identities:
        torch.testing.assert_close(apply_dsa(x, p), x, rtol=0, atol=1e-12)
    out = apply_dsa(x, replace(base, ops=("flip",), flip=torch.tensor([True, False, True, False])))
    assert torch.equal(out[0], x[0].flip(2)) and torch.equal(out[1], x[1])
    quarter = replace(base, ops=("rotate",), rotate=torch.full((4,), math.pi / 2, dtype=torch.float64))
    torch.testing.assert_close(apply_dsa(x, quarter), x.rot90(1, (2, 3)), rtol=0, atol=1e-10)
    shift = torch.tensor([[1, -2], [0, 0], [-1, 1], [2, 2]])
    out = apply_dsa(x, replace(base, ops=("crop",), translate=shift))
    for b, (dy, dx) in enumerate(shift.tolist()):
        for i in range(8):
            for j in range(8):
                inside = 0 <= i + dy < 8 and 0 <= j + dx < 8
                assert out[b, :, i, j].tolist() == (x[b, :, i + dy, j + dx].tolist() if inside else [0.0] * 3)
    centres = torch.tensor([[4, 4], [0, 0], [8, 3], [2, 7]])
    cut = replace(base, ops=("cutout",), cutout=centres, cutout_size=(4, 4))
    zeroed = (apply_dsa(torch.ones_like(x), cut) == 0).all(1).sum((1, 2)).tolist()
    assert zeroed == [16, 4, 8, 12]  # 4x4 squares clipped at the borders
    # contrast and saturation keep each image's mean; brightness shifts it
    color = replace(base, ops=("color",), brightness=0.25 * ones, saturation=0.5 * ones, contrast=1.5 * ones)
    torch.testing.assert_close(apply_dsa(x, color).mean((1, 2, 3)), x.mean((1, 2, 3)) + 0.25)


def test_dsa_strategy_parsing_and_validation() -> None:
    assert parse_strategy("none") == () and parse_strategy("") == ()
    assert parse_strategy("flip_rotate") == ("flip", "rotate")
    with pytest.raises(ValueError, match="unknown DSA op"):
        parse_strategy("flip_jitter")
    single = DSAParams.sample("color_crop_flip", 3, (8, 8), _gen(8))
    assert len(single.ops) == 1 and single.ops[0] in ("color", "crop", "flip")
    x = _images(3)
    assert torch.equal(apply_dsa(x, DSAParams.sample("none", 3, (8, 8), _gen(0))), x)
    with pytest.raises(ValueError, match="image"):
        apply_dsa(torch.zeros(3, 1, 6, 6), single)
    seen = {DSAParams.sample("color_crop_flip", 3, (8, 8), _gen(s)).ops[0] for s in range(30)}
    assert seen == {"color", "crop", "flip"}
