"""The reasoning training methods on a tiny Llama: REDI moves the chosen answer up and the rejected one
down; DPO starts at log 2 (policy == reference), matches a full-softmax reference and keeps its
reference the initial student across a resume; step_by_step is the hand-computed per-row mean NLL
combination; trace_sft is sft; the configs refuse a recipe without a factory."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from distill.configs.base import METHOD_CONFIGS
from distill.configs.lm import SFTConfig
from distill.configs.reasoning import PairwiseConfig, StepByStepConfig, TraceSFTConfig
from distill.data.batching import IGNORE, Batch, collate
from distill.data.pairs import Pair, PairStream
from distill.data.tokenize import TokenizedExample
from distill.engine.trainer import accumulate_gradients, train
from distill.losses.preference import dpo_loss
from distill.methods.base import METHODS, Phase, StepContext
from distill.methods.lm.base import LMContext
from distill.methods.lm.cross_entropy import SFTMethod
from distill.methods.lm.pairwise import PairwiseMethod
from distill.methods.lm.step_by_step import StepByStepMethod
from distill.methods.lm.trace_sft import TraceSFTMethod
from distill.recipe import TrainConfig
from tests.conftest import tiny_llama

V = 48
PHASE = Phase()


def _pairs(n: int = 6, seed: int = 0) -> list[Pair]:
    """Pairs sharing a prompt; the two answers use disjoint token ranges so they never coincide."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(3, V, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        a = torch.randint(3, V // 2, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        b = torch.randint(V // 2, V, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        out.append((TokenizedExample(prompt + a, len(prompt)), TokenizedExample(prompt + b, len(prompt))))
    return out


def _ctx(student: torch.nn.Module, chunk_size: int = 5) -> LMContext:
    return LMContext(student=student, teacher=None, vocab_size=V, chunk_size=chunk_size)  # type: ignore[arg-type]


def _step_ctx(method: object, batch: Batch) -> StepContext:
    units = float(method.loss_units(batch, PHASE))  # type: ignore[attr-defined]
    modules = method.modules()  # type: ignore[attr-defined]
    return StepContext(modules=modules, normalizer=units, phase=PHASE, step=0, device=torch.device("cpu"))


def _batch(pairs: list[Pair]) -> Batch:
    return PairStream(pairs, len(pairs), 0, seed=0).next_batch()


def _naive_row_logprobs(model: torch.nn.Module, batch: Batch) -> tuple[list[float], list[int]]:
    """Full-vocabulary log-softmax of the whole model's logits, summed row by row in Python."""
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits.double()
    logp = torch.log_softmax(logits[..., :V], -1)
    sums, counts = [], []
    for r in range(batch.input_ids.shape[0]):
        total, n = 0.0, 0
        for t in range(batch.input_ids.shape[1]):
            target = int(batch.targets[r, t])
            if target != IGNORE:
                total += float(logp[r, t, target])
                n += 1
        sums.append(total)
        counts.append(n)
    return sums, counts


def _update(method: object, batch: Batch, opt: torch.optim.Optimizer) -> dict[str, float]:
    opt.zero_grad(set_to_none=True)
    _, parts, _ = accumulate_gradients(Accelerator(cpu=True), method, method.modules(), [batch])  # type: ignore[arg-type, attr-defined]
    opt.step()
    return parts


def test_methods_and_configs_are_registered() -> None:
    for name, cls in [
        ("pairwise", PairwiseMethod),
        ("step_by_step", StepByStepMethod),
        ("trace_sft", TraceSFTMethod),
    ]:
        assert METHODS.get(name) is cls
        cfg_cls = METHOD_CONFIGS.get(name)
        assert cfg_cls.family == "lm" and not cfg_cls.teacher_needs


def test_redi_raises_the_chosen_and_lowers_the_rejected() -> None:
    student = tiny_llama(vocab=V, layers=2, seed=1)
    method = PairwiseMethod(PairwiseConfig(alpha=0.5), _ctx(student))
    assert "reference" not in method.frozen_modules()
    batch = _batch(_pairs())
    before, counts = _naive_row_logprobs(student, batch)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    parts = [_update(method, batch, opt) for _ in range(6)]
    after, _ = _naive_row_logprobs(student, batch)
    b = len(before) // 2
    assert sum(after[:b]) > sum(before[:b]) + 1.0
    assert sum(after[b:]) < sum(before[b:]) - 1.0
    assert parts[-1]["margin"] > parts[0]["margin"] and parts[-1]["pair_accuracy"] == 1.0
    per_token = sum(s / n for s, n in zip(before[:b], counts[:b], strict=True)) / b
    assert parts[0]["chosen_logp"] == pytest.approx(per_token, abs=1e-4)


def test_dpo_starts_at_log_two_and_matches_a_full_softmax_reference() -> None:
    student = tiny_llama(vocab=V, layers=2, dtype=torch.float64, seed=2)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    method = PairwiseMethod(PairwiseConfig(objective="dpo", beta=0.5, sft_weight=0.2), _ctx(student, 3))
    reference = method.reference
    assert reference is not None and method.frozen_modules()["reference"] is reference
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    batch = _batch(_pairs(seed=3))
    loss, parts = method.loss(_step_ctx(method, batch), batch)
    assert parts["dpo"] == pytest.approx(math.log(2), abs=1e-12) and parts["margin"] == 0.0
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(3):
        _update(method, batch, opt)
    for key, value in reference.lm.state_dict().items():  # the reference stays the initial student
        assert torch.equal(value, initial[key]), key
    pol, pol_n = _naive_row_logprobs(student, batch)
    ref, _ = _naive_row_logprobs(reference.lm, batch)
    b = len(pol) // 2
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    want_dpo = dpo_loss(t(pol[:b]), t(pol[b:]), t(ref[:b]), t(ref[b:]), 0.5).mean()
    want_sft = -(t(pol[:b]) / t(pol_n[:b])).mean()
    loss, parts = method.loss(_step_ctx(method, batch), batch)
    assert float(want_dpo) < math.log(2) - 0.05
    assert parts["dpo"] == pytest.approx(float(want_dpo), abs=1e-9)
    assert float(loss.detach()) == pytest.approx(float(want_dpo + 0.2 * want_sft), abs=1e-9)


def _dpo_run(out: Path, steps: int, resume: bool) -> dict[str, torch.Tensor]:
    student = tiny_llama(vocab=V, layers=2, seed=4)
    method = PairwiseMethod(PairwiseConfig(objective="dpo"), _ctx(student))
    stream = PairStream(_pairs(8, seed=5), 2, 0, seed=0)
    cfg = TrainConfig(steps=steps, lr=1e-2, checkpoint_every=2, schedule="constant", threads=1)
    train(method=method, stream=stream, cfg=cfg, out_dir=out, seed=0, resume=resume)
    return {k: v.clone() for k, v in student.state_dict().items()}


def test_dpo_through_the_engine_resumes_with_the_initial_reference(tmp_path: Path) -> None:
    straight = _dpo_run(tmp_path / "a", 4, resume=False)
    rows = [json.loads(r) for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss_units"] == 2 and rows[0]["dpo"] == pytest.approx(math.log(2), abs=1e-6)
    _dpo_run(tmp_path / "b", 4, resume=False)
    resumed = _dpo_run(tmp_path / "b", 4, resume=True)  # from the step-2 checkpoint, a new method
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)


def test_step_by_step_is_the_per_row_mean_nll_combination() -> None:
    student = tiny_llama(vocab=V, layers=2, dtype=torch.float64, seed=6)
    method = StepByStepMethod(StepByStepConfig(rationale_weight=0.3), _ctx(student, 4))
    batch = _batch(_pairs(5, seed=7))
    assert method.loss_units(batch, PHASE) == 5
    sums, counts = _naive_row_logprobs(student, batch)
    nll = [-s / n for s, n in zip(sums, counts, strict=True)]
    want_label, want_rationale = sum(nll[:5]) / 5, sum(nll[5:]) / 5
    loss, parts = method.loss(_step_ctx(method, batch), batch)
    assert parts["label"] == pytest.approx(want_label, abs=1e-10)
    assert parts["rationale"] == pytest.approx(want_rationale, abs=1e-10)
    assert float(loss.detach()) == pytest.approx(want_label + 0.3 * want_rationale, abs=1e-10)
    loss.backward()
    assert all(p.grad is not None for p in student.model.layers[0].parameters())


def test_pair_methods_refuse_an_odd_batch() -> None:
    method = StepByStepMethod(StepByStepConfig(), _ctx(tiny_llama(vocab=V, layers=1)))
    exs = [a for a, _ in _pairs(3)]
    with pytest.raises(Exception, match="even number of rows"):
        method.loss_units(collate(exs, [[0], [1], [2]], 0, False), PHASE)


def test_trace_sft_is_sft() -> None:
    student = tiny_llama(vocab=V, layers=2, dtype=torch.float64, seed=8)
    batch = collate([a for a, _ in _pairs(4)], [[0], [1], [2], [3]], 0, False)
    sft, trace = SFTMethod(SFTConfig(), _ctx(student)), TraceSFTMethod(TraceSFTConfig(), _ctx(student))
    assert trace.loss_units(batch, PHASE) == batch.num_loss_tokens
    a, _ = sft.loss(_step_ctx(sft, batch), batch)
    b, parts = trace.loss(_step_ctx(trace, batch), batch)
    assert float(a.detach()) == float(b.detach()) and "ce" in parts


def test_configs_need_a_factory_and_name_their_views() -> None:
    recipe = SimpleNamespace(factory=None, data=SimpleNamespace(packing=False))
    for cfg in (PairwiseConfig(), StepByStepConfig(), TraceSFTConfig()):
        with pytest.raises(ValueError, match="needs a `factory` section"):
            cfg.check(recipe)  # type: ignore[arg-type]
        cfg.check(SimpleNamespace(factory=object(), data=SimpleNamespace(packing=False)))  # type: ignore[arg-type]
    packed = SimpleNamespace(factory=object(), data=SimpleNamespace(packing=True))
    with pytest.raises(ValueError, match="data.packing"):
        PairwiseConfig().check(packed)  # type: ignore[arg-type]
    TraceSFTConfig().check(packed)  # type: ignore[arg-type]  # plain examples may be packed
    assert PairwiseConfig().data_view == "pairs" and PairwiseConfig().eval_prefix == ""
    sbs = StepByStepConfig(label_prefix="[a] ")
    assert sbs.data_view == "step_by_step" and sbs.eval_prefix == "[a] "
    assert TraceSFTConfig(traces="shortest").data_view == "shortest"
    with pytest.raises(ValueError, match="rationale_prefix"):
        StepByStepConfig(label_prefix="x", rationale_prefix="x")
    with pytest.raises(ValueError):
        PairwiseConfig(alpha=1.5)
