"""Chunked LM-head loss: equals the naive autograd computation, normalises per global token count."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from distill.losses import fused_head
from distill.losses.fused_head import TeacherLogitsFn, chunked_head_loss, reference_head_loss
from distill.losses.tokens import DIVERGENCES, DivergenceSpec, block_rows, divergence_value_and_grad

N, H, V = 13, 6, 17


def _problem(seed: int = 0, dtype: torch.dtype = torch.float64, teacher_vocab: int = V) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7).to(dtype).requires_grad_()
    teacher = (torch.randn(N, teacher_vocab, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    return {"hidden": hidden, "weight": weight, "teacher": teacher, "labels": labels}


def _run(fn: Any, prob: dict[str, Any], scale: float = 1.0, **kwargs: Any) -> tuple[Any, ...]:
    """Loss, parts, and gradients of ``scale * loss`` w.r.t. whichever of hidden/weight require grad."""
    kwargs.setdefault("labels", prob["labels"])
    kwargs.setdefault("teacher_logits", lambda s, e: prob["teacher"][s:e])
    loss, parts = fn(prob["hidden"], prob["weight"], **kwargs)
    inputs = [t for t in (prob["hidden"], prob["weight"]) if t.requires_grad]
    grads = torch.autograd.grad(loss * scale, inputs)
    return (loss.detach(), parts, *grads)


def _rows_of(logits: torch.Tensor) -> TeacherLogitsFn:
    return lambda start, end: logits[start:end]


def _assert_same(a: tuple[Any, ...], b: tuple[Any, ...], tol: float = 1e-9) -> None:
    assert len(a) == len(b)
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        torch.testing.assert_close(a[1][key], b[1][key], rtol=tol, atol=tol)
    for x, y in zip(a[2:], b[2:], strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [1, 7, N, 4 * N])
def test_chunked_equals_reference(name: str, chunk_size: int) -> None:
    prob = _problem()
    kwargs = {
        "spec": DivergenceSpec(name, temperature=1.7),
        "kd_weight": 0.7,
        "ce_weight": 0.3,
        "normalizer": 5.0,
    }
    chunked = _run(chunked_head_loss, prob, scale=2.5, chunk_size=chunk_size, **kwargs)
    reference = _run(reference_head_loss, prob, scale=2.5, **kwargs)
    _assert_same(chunked, reference)
    assert set(chunked[1]) == {"kd", "ce"}


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_fresh_teacher_chunks_may_be_overwritten(name: str, ce_weight: float) -> None:
    """With teacher_logits_fresh the loss overwrites each chunk it is given: same results as the reference."""
    prob = _problem(3)
    teacher = prob["teacher"]
    kwargs: dict[str, Any] = {
        "spec": DivergenceSpec(name, temperature=1.3),
        "ce_weight": ce_weight,
        "normalizer": 4.0,
    }
    chunked = _run(
        chunked_head_loss,
        prob,
        chunk_size=5,
        teacher_logits=lambda s, e: teacher[s:e].clone(),  # a new tensor per call
        teacher_logits_fresh=True,
        **kwargs,
    )
    reference = _run(reference_head_loss, prob, **kwargs)
    _assert_same(chunked, reference)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("fresh", [False, True], ids=["shared", "fresh"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.2])
def test_row_blocked_divergence_in_the_fused_head(
    name: str, fresh: bool, ce_weight: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused head with its divergence and cross-entropy split into 2-row blocks (as on CPU at real
    vocabulary sizes) equals the reference, handed-over teacher chunks and all."""
    monkeypatch.setattr(
        fused_head, "divergence_value_and_grad", partial(divergence_value_and_grad, block_elements=2 * V)
    )
    monkeypatch.setattr(fused_head, "block_rows", partial(block_rows, block_elements=2 * V))
    prob = _problem(4)
    teacher = prob["teacher"]
    kwargs: dict[str, Any] = {
        "spec": DivergenceSpec(name, temperature=0.8),
        "ce_weight": ce_weight,
        "normalizer": 6.0,
    }
    chunked = _run(
        chunked_head_loss,
        prob,
        chunk_size=7,
        teacher_logits=(lambda s, e: teacher[s:e].clone()) if fresh else _rows_of(teacher),
        teacher_logits_fresh=fresh,
        **kwargs,
    )
    _assert_same(chunked, _run(reference_head_loss, prob, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_row_blocked_cross_entropy(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """CE alone computes in the logits' own buffer, in 3-row blocks: same as the reference."""
    monkeypatch.setattr(fused_head, "block_rows", partial(block_rows, block_elements=3 * V))
    prob = _problem(5, dtype=dtype)
    kwargs: dict[str, Any] = {"teacher_logits": None, "kd_weight": 0.0, "ce_weight": 1.0, "normalizer": 9.0}
    chunked = _run(chunked_head_loss, prob, chunk_size=8, **kwargs)
    _assert_same(
        chunked, _run(reference_head_loss, prob, **kwargs), tol=1e-9 if dtype == torch.float64 else 1e-5
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"labels": None, "kd_weight": 1.0},  # KD only
        {"teacher_logits": None, "kd_weight": 0.0, "ce_weight": 1.0},  # CE only
        {"kd_weight": 0.0, "ce_weight": 1.0},  # KD computed for logging only
        {"kd_weight": 1.0, "ce_weight": 0.0},  # CE computed for logging only
    ],
    ids=["kd", "ce", "ce+kd-logged", "kd+ce-logged"],
)
def test_single_terms(kwargs: dict[str, Any]) -> None:
    prob = _problem(1)
    spec = DivergenceSpec("jsd", beta=0.3)
    chunked = _run(chunked_head_loss, prob, spec=spec, normalizer=N, chunk_size=4, **kwargs)
    _assert_same(chunked, _run(reference_head_loss, prob, spec=spec, normalizer=N, **kwargs))
    expected_parts = {
        k for k, arg in (("kd", "teacher_logits"), ("ce", "labels")) if kwargs.get(arg, True) is not None
    }
    assert set(chunked[1]) == expected_parts


def test_cross_entropy_is_the_usual_mean_at_temperature_one() -> None:
    prob = _problem(2)
    spec = DivergenceSpec("forward_kl", temperature=3.0)  # must not leak into CE
    _, parts = chunked_head_loss(
        prob["hidden"],
        prob["weight"],
        labels=prob["labels"],
        teacher_logits=lambda s, e: prob["teacher"][s:e],
        spec=spec,
        ce_weight=1.0,
        normalizer=N,
        chunk_size=5,
    )
    logits = prob["hidden"] @ prob["weight"].T
    torch.testing.assert_close(parts["ce"], F.cross_entropy(logits, prob["labels"]).detach())


def test_split_rows_with_global_normalizer_sum_to_one_call() -> None:
    """Gradient accumulation: micro-batches divided by the global token count add up to the big batch."""
    prob = _problem(3)
    teacher, labels = prob["teacher"], prob["labels"]
    hidden, weight = prob["hidden"], prob["weight"]
    kwargs: dict[str, Any] = {"spec": DivergenceSpec("skew_forward_kl"), "ce_weight": 0.5, "normalizer": 11.0}
    whole, whole_parts = chunked_head_loss(
        hidden, weight, labels=labels, teacher_logits=lambda s, e: teacher[s:e], chunk_size=4, **kwargs
    )
    whole_grads = torch.autograd.grad(whole, (hidden, weight))
    cut = 5
    total = torch.zeros((), dtype=torch.float64)
    total_parts = {"kd": torch.zeros((), dtype=torch.float64), "ce": torch.zeros((), dtype=torch.float64)}
    for start, end in ((0, cut), (cut, N)):
        rows_teacher = teacher[start:end]
        part, parts = chunked_head_loss(
            hidden[start:end],
            weight,
            labels=labels[start:end],
            teacher_logits=_rows_of(rows_teacher),
            chunk_size=4,
            **kwargs,
        )
        total = total + part
        total_parts = {k: total_parts[k] + parts[k] for k in total_parts}
    split_grads = torch.autograd.grad(total, (hidden, weight))
    _assert_same((whole.detach(), whole_parts, *whole_grads), (total.detach(), total_parts, *split_grads))


@pytest.mark.parametrize("fresh", [False, True], ids=["shared", "fresh"])
@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd"])
def test_padded_teacher_vocab_is_sliced(name: str, fresh: bool) -> None:
    prob = _problem(4)
    padded = torch.cat([prob["teacher"], torch.full((N, 7), 50.0, dtype=torch.float64)], dim=1)
    spec = DivergenceSpec(name)
    plain = _run(chunked_head_loss, prob, spec=spec, normalizer=N, chunk_size=6)
    sliced = _run(
        chunked_head_loss,
        prob,
        spec=spec,
        normalizer=N,
        chunk_size=6,
        # fresh: a new padded tensor per call, so the loss overwrites a non-contiguous slice of it
        teacher_logits=(lambda s, e: padded[s:e].clone()) if fresh else (lambda s, e: padded[s:e]),
        teacher_logits_fresh=fresh,
    )
    _assert_same(plain, sliced, tol=1e-12 if fresh else 0.0)
    reference = _run(
        reference_head_loss, prob, spec=spec, normalizer=N, teacher_logits=lambda s, e: padded[s:e]
    )
    _assert_same(plain, reference)


@pytest.mark.parametrize("fn", [chunked_head_loss, reference_head_loss])
def test_smaller_teacher_vocab_raises(fn: Any) -> None:
    prob = _problem(5)
    with pytest.raises(ValueError, match="smaller than the student"):
        fn(
            prob["hidden"],
            prob["weight"],
            teacher_logits=lambda s, e: prob["teacher"][s:e, : V - 1],
            normalizer=N,
        )


@pytest.mark.parametrize("name", DIVERGENCES)
def test_masked_teacher_logits_give_finite_loss_and_grads(name: str) -> None:
    prob = _problem(6)
    prob["teacher"][:, :3] = -float("inf")
    prob["teacher"][4, 5:] = -float("inf")
    kwargs: dict[str, Any] = {
        "spec": DivergenceSpec(name, temperature=2.0),
        "ce_weight": 0.2,
        "normalizer": N,
    }
    chunked = _run(chunked_head_loss, prob, chunk_size=4, **kwargs)
    for tensor in (chunked[0], *chunked[1].values(), *chunked[2:]):
        assert torch.isfinite(tensor).all()
    _assert_same(chunked, _run(reference_head_loss, prob, **kwargs))


def test_frozen_head_and_frozen_hidden() -> None:
    spec = DivergenceSpec("jsd")
    frozen_head = _problem(7)
    frozen_head["weight"].requires_grad_(False)
    chunked = _run(chunked_head_loss, frozen_head, spec=spec, ce_weight=1.0, normalizer=N, chunk_size=3)
    assert len(chunked) == 3  # loss, parts, d/d hidden
    _assert_same(chunked, _run(reference_head_loss, frozen_head, spec=spec, ce_weight=1.0, normalizer=N))

    frozen_hidden = _problem(7)
    frozen_hidden["hidden"].requires_grad_(False)
    chunked = _run(chunked_head_loss, frozen_hidden, spec=spec, ce_weight=1.0, normalizer=N, chunk_size=3)
    _assert_same(chunked, _run(reference_head_loss, frozen_hidden, spec=spec, ce_weight=1.0, normalizer=N))


def test_no_grad_mode_returns_values() -> None:
    prob = _problem(8)
    with torch.no_grad():
        loss, parts = chunked_head_loss(
            prob["hidden"],
            prob["weight"],
            labels=prob["labels"],
            teacher_logits=lambda s, e: prob["teacher"][s:e],
            ce_weight=1.0,
            normalizer=N,
        )
    assert not loss.requires_grad
    expected, _ = reference_head_loss(
        prob["hidden"],
        prob["weight"],
        labels=prob["labels"],
        teacher_logits=lambda s, e: prob["teacher"][s:e],
        ce_weight=1.0,
        normalizer=N,
    )
    torch.testing.assert_close(loss, expected.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    prob = _problem(9, dtype=dtype)
    spec = DivergenceSpec("forward_kl", temperature=2.0)
    loss, parts, d_hidden, d_weight = _run(
        chunked_head_loss, prob, spec=spec, ce_weight=0.5, normalizer=N, chunk_size=4
    )
    assert loss.dtype == torch.float32 and d_hidden.dtype == d_weight.dtype == dtype
    # the float64 reference on the same rounded inputs and the same rounded logits
    exact = {
        k: v.detach().double().requires_grad_() if k in ("hidden", "weight") else v for k, v in prob.items()
    }
    ref = _run(reference_head_loss, exact, spec=spec, ce_weight=0.5, normalizer=N)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(loss.double(), ref[0], rtol=tol, atol=tol)
    for got, want in zip((d_hidden, d_weight), ref[2:], strict=True):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_teacher_is_asked_chunk_by_chunk() -> None:
    prob = _problem(10)
    calls: list[tuple[int, int]] = []

    def teacher(start: int, end: int) -> torch.Tensor:
        calls.append((start, end))
        return prob["teacher"][start:end]

    chunked_head_loss(prob["hidden"], prob["weight"], teacher_logits=teacher, normalizer=N, chunk_size=5)
    assert calls == [(0, 5), (5, 10), (10, 13)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labels": torch.full((N,), -100)}, "labels"),
        ({"labels": torch.full((N,), V)}, "labels"),
        ({"labels": torch.zeros(N + 1, dtype=torch.long)}, "labels"),
        ({"teacher_logits": None, "labels": None}, "nothing to compute"),
        ({"teacher_logits": None}, "teacher_logits"),
        ({"labels": None, "ce_weight": 1.0}, "labels"),
        ({"normalizer": 0.0}, "normalizer"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"teacher_logits": lambda s, e: torch.zeros(e - s + 1, V)}, "must return"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict[str, Any], match: str) -> None:
    prob = _problem(11)
    args: dict[str, Any] = {
        "labels": prob["labels"],
        "teacher_logits": lambda s, e: prob["teacher"][s:e],
        "normalizer": N,
    } | kwargs
    for fn in (chunked_head_loss, reference_head_loss):
        with pytest.raises(ValueError, match=match):
            fn(prob["hidden"], prob["weight"], **args)


def test_hidden_must_be_two_dimensional() -> None:
    prob = _problem(12)
    with pytest.raises(ValueError, match=r"\(N, H\)"):
        chunked_head_loss(
            prob["hidden"].unsqueeze(0),
            prob["weight"],
            labels=prob["labels"],
            normalizer=N,
            kd_weight=0.0,
            ce_weight=1.0,
        )


def test_cross_entropy_paths_agree() -> None:
    """The blocked in-place CE (CPU, contiguous) and the plain one (other devices, strided logits) agree."""
    g = torch.Generator().manual_seed(6)
    wide = torch.randn(9, 2 * V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (9, 1), generator=g)
    plain = fused_head._cross_entropy_(wide[:, :V], labels, 0.5, in_place=False)  # strided: plain path
    blocked = fused_head._cross_entropy_(wide[:, :V].contiguous(), labels, 0.5, in_place=True)
    expected = torch.log_softmax(wide[:, :V], -1)
    torch.testing.assert_close(plain[0], expected.gather(1, labels).sum(), rtol=1e-12, atol=1e-12)
    for got in (plain, blocked):
        torch.testing.assert_close(got[0], plain[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1], 0.5 * expected.exp(), rtol=1e-12, atol=1e-12)
