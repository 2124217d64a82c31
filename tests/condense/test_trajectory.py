"""MTT pieces: expert trajectories, the expert buffer, differentiable unrolls and their memory regimes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from distill.classifier.models import build_model
from distill.condense.dsa import DSAParams, apply_dsa
from distill.condense.experts import ExpertBuffer, train_expert, train_experts
from distill.condense.trajectory import (
    SavedTensorMeter,
    UnrollMode,
    peak_unroll_memory,
    saved_bytes_by_steps,
    stateless_buffers,
    trajectory_loss,
    unroll,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cnn(dtype: torch.dtype = torch.float64) -> Callable[[], nn.Module]:
    return lambda: build_model("cnn", [1, 8, 8], 10, {"width": 2}).to(dtype)


def _mlp() -> nn.Module:
    return build_model("mlp", [1, 8, 8], 10, {"hidden": [8]}).double()


def _data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = _gen(seed)
    return torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64), torch.arange(n) % 10


def _synthetic(ipc: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = _gen(seed)
    x = torch.randn(10 * ipc, 1, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.arange(10).repeat_interleave(ipc)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    return x, y, lr


def _start_target(
    model_fn: Callable[[], nn.Module],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = model_fn()
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    gen = _gen(2)
    target = {k: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in start.items()}
    return start, target


# ---------------------------------------------------------------- experts


def test_train_expert_records_every_epoch_deterministically() -> None:
    x, y = _data()
    state = torch.random.get_rng_state()
    traj = train_expert(_cnn(), x, y, epochs=3, lr=0.05, batch_size=16, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert len(traj) == 4
    torch.manual_seed(7)
    init = dict(_cnn()().named_parameters())
    for k, v in traj[0].items():
        assert torch.equal(v, init[k].detach())
    assert all(not torch.equal(traj[e]["head.weight"], traj[e + 1]["head.weight"]) for e in range(3))
    again = train_expert(_cnn(), x, y, epochs=3, lr=0.05, batch_size=16, seed=7)
    assert all(torch.equal(traj[-1][k], again[-1][k]) for k in traj[-1])
    other = train_expert(_cnn(), x, y, epochs=3, lr=0.05, batch_size=16, seed=8)
    assert not torch.equal(traj[-1]["head.weight"], other[-1]["head.weight"])


def test_flat_expert_penalty_changes_the_path() -> None:
    x, y = _data()
    plain = train_expert(_cnn(), x, y, epochs=2, lr=0.05, batch_size=20, seed=0)
    flat = train_expert(_cnn(), x, y, epochs=2, lr=0.05, batch_size=20, seed=0, flat_penalty=0.5)
    assert all(torch.equal(plain[0][k], flat[0][k]) for k in plain[0])  # same start
    assert all(torch.isfinite(v).all() for v in flat[-1].values())
    assert not torch.allclose(plain[-1]["head.weight"], flat[-1]["head.weight"])
    aug = train_expert(
        _cnn(),
        x,
        y,
        1,
        0.05,
        20,
        0,
        augment=lambda xb, g: apply_dsa(xb, DSAParams.sample("flip", len(xb), (8, 8), g)),
    )
    assert len(aug) == 2
    with pytest.raises(ValueError, match="flat_penalty"):
        train_expert(_cnn(), x, y, 1, 0.05, 20, 0, flat_penalty=-1)


def test_expert_buffer_roundtrip_and_window(tmp_path: Path) -> None:
    x, y = _data(20)
    buf = ExpertBuffer(tmp_path / "experts", expert_epochs=2, max_start_epoch=2)
    paths = train_experts(buf, 2, _cnn(torch.float32), x.float(), y, epochs=4, lr=0.05, batch_size=10, seed=3)
    assert [p.name for p in paths] == ["expert_0000.safetensors", "expert_0001.safetensors"]
    assert len(buf) == 2 and buf.epochs(0) == 4
    with safe_open(str(paths[0]), framework="pt") as f:
        keys = set(f.keys())
    assert "epoch0.stem.0.weight" in keys and "epoch4.head.bias" in keys and len(keys) % 5 == 0
    trajs = [buf.load(0), buf.load(1)]
    expected = train_expert(_cnn(torch.float32), x.float(), y, epochs=4, lr=0.05, batch_size=10, seed=4)
    assert all(torch.equal(trajs[1][e][k], expected[e][k]) for e in range(5) for k in expected[e])

    def locate(params: dict[str, torch.Tensor]) -> tuple[int, int]:
        hits = [
            (i, e)
            for i, t in enumerate(trajs)
            for e, p in enumerate(t)
            if all(torch.equal(p[k], params[k]) for k in p)
        ]
        assert len(hits) == 1
        return hits[0]

    gen = _gen(0)
    starts = set()
    for _ in range(12):
        start, target = buf.sample(gen)
        (i, e), (j, f) = locate(start), locate(target)
        assert i == j and f == e + 2 and 0 <= e <= 2
        starts.add(e)
    assert starts == {0, 1, 2}
    for _ in range(4):  # DATM: a narrowed window
        start, _ = buf.sample(gen, min_start_epoch=1, max_start_epoch=1)
        assert locate(start)[1] == 1
    with pytest.raises(ValueError, match="exceeds"):
        buf.sample(gen, max_start_epoch=3)
    with pytest.raises(ValueError, match="no experts"):
        ExpertBuffer(tmp_path / "empty", 1, 0).sample(gen)
    with pytest.raises(ValueError, match="min_start_epoch"):
        ExpertBuffer(tmp_path, 1, max_start_epoch=0, min_start_epoch=1)


# ---------------------------------------------------------------- unroll


def test_plain_unroll_is_sgd_on_the_synthetic_set() -> None:
    start, _ = _start_target(_mlp)
    x, y, lr = _synthetic()
    out = unroll(_mlp(), start, x, y, lr, steps=4, batch_size=None, generator=_gen(0))
    ref = _mlp()
    ref.load_state_dict(start)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(ref(x.detach()), y).backward()
        opt.step()
    for k, p in ref.named_parameters():
        torch.testing.assert_close(out[k], p.detach(), rtol=1e-12, atol=1e-12)


def test_unroll_leaves_batchnorm_state_alone() -> None:
    model = _cnn()()
    before = {k: b.clone() for k, b in model.named_buffers()}
    start, _ = _start_target(_cnn())
    x, y, lr = _synthetic()
    unroll(model, start, x, y, lr, steps=2, batch_size=None, generator=_gen(0))
    assert all(torch.equal(b, before[k]) for k, b in model.named_buffers())
    assert all(v is None for k, v in stateless_buffers(model).items() if "running" in k or "num_batches" in k)


def _grads(
    mode: UnrollMode,
    window: int | None = None,
    soft: bool = False,
    batch_size: int | None = 6,
    steps: int = 5,
    augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    start, target = _start_target(_cnn())
    x, y, lr = _synthetic()
    wrt = [x, lr]
    if soft:
        y = F.softmax(torch.randn(len(y), 10, generator=_gen(5), dtype=torch.float64), 1).requires_grad_(True)
        wrt.append(y)
    final = unroll(
        _cnn()(),
        start,
        x,
        y,
        lr,
        steps,
        batch_size,
        _gen(11),
        mode=mode,
        window=window,
        augment=augment,
    )
    return list(torch.autograd.grad(trajectory_loss(final, start, target), wrt))


@pytest.mark.parametrize("soft", [False, True])
def test_checkpoint_and_full_truncate_match_plain(soft: bool) -> None:
    plain = _grads("plain", soft=soft)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in plain)
    for other in (_grads("checkpoint", soft=soft), _grads("truncate", window=5, soft=soft)):
        for a, b in zip(plain, other, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_checkpoint_matches_plain_with_per_step_dsa() -> None:
    draws = [DSAParams.sample("color_crop_flip_scale", 6, (8, 8), _gen(s), one_of=False) for s in range(4)]

    def augment(xb: torch.Tensor, step: int) -> torch.Tensor:
        return apply_dsa(xb, draws[step])

    plain = _grads("plain", steps=4, augment=augment)
    ckpt = _grads("checkpoint", steps=4, augment=augment)
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_short_truncation_is_finite_and_only_sees_the_window() -> None:
    full = _grads("plain")
    short = _grads("truncate", window=2)
    assert all(torch.isfinite(g).all() for g in short)
    assert not torch.allclose(full[0], short[0])
    # the forward result does not depend on the mode
    start, _ = _start_target(_cnn())
    x, y, lr = _synthetic()
    a = unroll(_cnn()(), start, x, y, lr, 5, 6, _gen(3))
    b = unroll(_cnn()(), start, x, y, lr, 5, 6, _gen(3), mode="truncate", window=2)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-12) for k in a)


def test_unroll_validation() -> None:
    start, _ = _start_target(_cnn())
    x, y, lr = _synthetic()
    model = _cnn()()
    with pytest.raises(ValueError, match="window"):
        unroll(model, start, x, y, lr, 3, None, _gen(0), mode="truncate")
    with pytest.raises(ValueError, match="window only"):
        unroll(model, start, x, y, lr, 3, None, _gen(0), mode="plain", window=2)
    with pytest.raises(ValueError, match="unknown unroll mode"):
        unroll(model, start, x, y, lr, 3, None, _gen(0), mode="nested")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="0-d"):
        unroll(model, start, x, y, lr.reshape(1), 3, None, _gen(0))


def test_trajectory_loss_values() -> None:
    start = {"w": torch.zeros(2, 2, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    target = {"w": torch.ones(2, 2, dtype=torch.float64), "b": torch.full((3,), 2.0, dtype=torch.float64)}
    assert trajectory_loss(start, start, target).item() == pytest.approx(1.0)
    assert trajectory_loss(target, start, target).item() == pytest.approx(0.0)
    half = {k: v / 2 for k, v in target.items()}
    assert trajectory_loss(half, start, target).item() == pytest.approx(0.25)
    final = {"w": torch.full((2, 2), 3.0, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    assert trajectory_loss(final, start, target).item() == pytest.approx((4 * 4 + 3 * 4) / (4 + 12))
    with pytest.raises(ValueError, match="same parameter names"):
        trajectory_loss({"w": final["w"]}, start, target)


# ---------------------------------------------------------------- memory


def test_saved_bytes_flat_for_truncate_linear_for_checkpoint() -> None:
    model_fn = _cnn(torch.float32)
    param_bytes = sum(p.numel() * p.element_size() for p in model_fn().parameters())
    steps = [10, 20, 40]
    trunc = saved_bytes_by_steps(model_fn, steps, "truncate", window=3)
    ckpt = saved_bytes_by_steps(model_fn, steps, "checkpoint")
    plain = saved_bytes_by_steps(model_fn, steps[:2], "plain")
    assert trunc[10] == trunc[20] == trunc[40] > 0
    for lo, hi in ((10, 20), (20, 40)):
        assert 0 < ckpt[hi] - ckpt[lo] <= param_bytes * (hi - lo)
    assert plain[20] - plain[10] > 5 * param_bytes * 10  # the double-backward graph of every step
    assert ckpt[20] < plain[20] and trunc[20] < plain[20]
    assert peak_unroll_memory(10, "truncate", window=3, model_fn=model_fn) == trunc[10]


def test_meter_counts_shared_storage_once_and_releases() -> None:
    w = torch.randn(100, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = (w * w).sum()  # mul saves w twice: one storage
    assert meter.current == meter.peak == w.numel() * w.element_size()
    y.backward()  # backward frees the saved tensors
    assert meter.current == 0 and meter.peak == 400
