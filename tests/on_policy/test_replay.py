"""DistiLLM's adaptive off-policy replay in `on_policy`: the per-batch decision rule, the probability
rising when the dataset loss stalls (and only then, up to its ceiling), the buffer (first in first out,
its state round-trips), replayed batches hold stored student outputs, the logged fractions, the config's
one-line errors, and a run resumed from a checkpoint equal to an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from distill.configs.on_policy import OnPolicyConfig, ReplayConfig, StudentSamplingConfig
from distill.data.batching import BatchStream
from distill.data.tokenize import TokenizedExample
from distill.engine.trainer import train
from distill.errors import CompatibilityError
from distill.methods.lm.on_policy import OnPolicyKD, SampledBatch
from distill.methods.lm.replay import AdaptiveReplay, ReplayBuffer
from distill.recipe_base import TrainConfig
from tests.engine.test_accumulation import _examples, lm_ctx
from tests.on_policy.test_on_policy import PHASE, _batch, _ctx, _models


def _rows(n: int, start: int = 0) -> list[TokenizedExample]:
    return [TokenizedExample(input_ids=[start + i, 7, 8 + i], prompt_len=1 + i % 2) for i in range(n)]


def test_decision_rule_follows_distillm() -> None:
    """fresh if r < p (1 - t/T) or the buffer is not full; replay if r < p; else the dataset's batch."""
    rep = AdaptiveReplay(ReplayConfig(buffer_size=2, start_prob=0.6))
    rep.total_steps = 10
    assert [rep.choose(r) for r in (0.0, 0.59, 0.6, 0.9)] == ["fresh", "fresh", "dataset", "dataset"]
    rep.buffer.add(_rows(2))
    rep.steps = 5  # fresh share p * 0.5 = 0.3
    assert [rep.choose(r) for r in (0.29, 0.3, 0.59, 0.6)] == ["fresh", "replay", "replay", "dataset"]
    rep.steps = 10  # at the end every student-output batch is replayed
    assert rep.choose(0.0) == "replay"
    assert rep.counts == {"fresh": 3, "replay": 3, "dataset": 3}
    parts = rep.parts(0.5)
    assert parts == {"sgo_prob": 0.3, "fresh_fraction": 1 / 6, "replay_fraction": 1 / 6}


def test_unknown_run_length_is_one_line() -> None:
    rep = AdaptiveReplay(ReplayConfig())
    with pytest.raises(CompatibilityError, match="set_total_steps"):
        rep.choose(0.5)


def test_probability_rises_when_the_dataset_loss_stalls_and_stops_at_its_ceiling() -> None:
    cfg = ReplayConfig(check_every=2, increment=0.25, max_prob=0.6, min_improvement=0.1)
    rep = AdaptiveReplay(cfg)
    # window means: 2.0 (first: nothing to compare), 1.5 (improved 25%), 1.45 (3%: stalled),
    # 1.6 (worse), then a window with no dataset batch (no decision), then 1.0 (improved)
    probs = []
    for mean in (2.0, 1.5, 1.45, 1.6, None, 1.0):
        for _ in range(cfg.check_every):
            if mean is not None:
                rep.record(mean * 5.0, 5.0)
            rep.end_step()
        probs.append(rep.prob)
    assert probs == [0.0, 0.0, 0.25, 0.5, 0.5, 0.5]
    rep.record(2.0, 1.0)
    rep.end_step()
    rep.end_step()
    assert rep.prob == 0.6  # capped at max_prob


def test_buffer_is_fifo_and_its_state_round_trips() -> None:
    buf = ReplayBuffer(3)
    buf.add(_rows(2))
    buf.add(_rows(2, start=10))
    assert buf.full and [r.input_ids[0] for r in buf.rows] == [1, 10, 11]
    again = ReplayBuffer(3)
    again.load_state_dict(buf.state_dict())
    assert [(r.input_ids, r.prompt_len) for r in again.rows] == [
        (r.input_ids, r.prompt_len) for r in buf.rows
    ]
    empty = ReplayBuffer(2)
    empty.load_state_dict(ReplayBuffer(2).state_dict())
    assert len(empty) == 0
    picked = buf.sample(2, torch.Generator().manual_seed(0))
    assert len({tuple(r.input_ids) for r in picked}) == 2


def test_replayed_batches_hold_stored_student_outputs() -> None:
    student, teacher = _models()
    cfg = OnPolicyConfig(
        sample=StudentSamplingConfig(max_new_tokens=4),
        replay=ReplayConfig(buffer_size=4, start_prob=1.0),
    )
    method = OnPolicyKD(cfg, lm_ctx(student, teacher))
    method.set_total_steps(1)  # past the first step the fresh share is 0: replay once the buffer is full
    first = method.prepare(_batch(), PHASE)
    assert isinstance(first, SampledBatch) and not first.replayed and first.generated > 0
    stored = {tuple(r.input_ids) for r in method.replay.buffer.rows}  # type: ignore[union-attr]
    method.after_step(PHASE, 0)
    second = method.prepare(_batch(), PHASE)
    assert isinstance(second, SampledBatch) and second.replayed and second.generated == 0
    assert second.stats()["replayed_batches"] == 1 and second.stats()["on_policy_batches"] == 1
    mask = second.attention_mask
    assert mask is not None
    rows = {tuple(second.input_ids[b, : int(mask[b].sum())].tolist()) for b in range(4)}
    assert rows == stored
    loss, parts = method.loss(_ctx({"student": method.body}, second), second)
    assert loss.requires_grad and parts["sgo_prob"] == pytest.approx(1.0)
    assert parts["fresh_fraction"] == pytest.approx(0.5) and parts["replay_fraction"] == pytest.approx(0.5)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="start_prob: 0.5 is above max_prob"):
        ReplayConfig(start_prob=0.5, max_prob=0.2)

    class _Data:
        batch_size, packing = 8, False

    class _Recipe:
        teacher, data = None, _Data()

    with pytest.raises(ValueError, match="^lmbda: with replay"):
        OnPolicyConfig(lmbda=0.3, replay=ReplayConfig()).check(_Recipe())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^replay.buffer_size"):
        OnPolicyConfig(replay=ReplayConfig(buffer_size=4)).check(_Recipe())  # type: ignore[arg-type]
    assert OnPolicyConfig(replay=ReplayConfig()).needs_completions


SEED = 1  # its run has every kind of batch on both sides of the step-5 checkpoint, and the probability
# rises on both sides: a state field left out of the checkpoint changes the resumed run (checked by hand)


def _run(out: Path, resume: bool, seed: int = SEED) -> tuple[dict[str, torch.Tensor], list[dict]]:
    student, teacher = _models()
    cfg = OnPolicyConfig(
        sample=StudentSamplingConfig(max_new_tokens=4),
        replay=ReplayConfig(
            buffer_size=4, start_prob=0.5, increment=0.25, check_every=1, min_improvement=0.5
        ),
    )
    ctx = lm_ctx(student, teacher)
    ctx.seed = seed
    method = OnPolicyKD(cfg, ctx)
    method.set_total_steps(10)
    stream = BatchStream(_examples(), 2, 0, seed=0, group_by_length=False, packing=False, max_length=64)
    tcfg = TrainConfig(steps=10, lr=1e-2, checkpoint_every=5, schedule="constant", threads=1)
    train(method=method, stream=stream, cfg=tcfg, out_dir=out, seed=0, resume=resume)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    return {k: v.clone() for k, v in student.state_dict().items()}, rows


def test_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    straight, rows = _run(tmp_path / "a", resume=False)
    kind = ["R" if r.get("replayed_batches") else "F" if r.get("on_policy_batches") else "D" for r in rows]
    probs = [r["sgo_prob"] for r in rows]
    assert "D" in kind[:5] and "R" in kind[5:] and "F" in kind[5:]  # the checkpoint is at step 5
    assert probs[0] < probs[4] < probs[-1]  # raised before the checkpoint and after (from restored state)
    _run(tmp_path / "b", resume=False)
    resumed, rows_b = _run(tmp_path / "b", resume=True)  # a new method from the step-5 checkpoint
    assert (tmp_path / "b" / "checkpoints" / "step-00000005").is_dir()
    timeless = [[(k, v) for k, v in r.items() if "seconds" not in k and "per_s" not in k] for r in rows]
    assert [
        [(k, v) for k, v in r.items() if "seconds" not in k and "per_s" not in k] for r in rows_b
    ] == timeless
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
