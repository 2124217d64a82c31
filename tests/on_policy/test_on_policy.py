"""`on_policy` (GKD), `drafter` and `minillm`: lmbda 0 is logit_kd exactly; sampled batches hold the
student's own completions of the same prompts and count the generated tokens; coins and samples resume
exactly; token selection keeps the easiest tokens; the MiniLLM pieces against naive references."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from distill.configs.on_policy import DrafterConfig, MiniLLMConfig, OnPolicyConfig, StudentSamplingConfig
from distill.data.batching import IGNORE, Batch, collate
from distill.engine.trainer import accumulate_gradients
from distill.generation.engine import generate_tokens
from distill.generation.sampling import SamplingSpec
from distill.losses.tokens import DivergenceSpec, divergence_per_token
from distill.methods.base import Phase
from distill.methods.lm.logit_kd import LogitKD
from distill.methods.lm.minillm import MiniLLM, _future_mean
from distill.methods.lm.on_policy import DrafterKD, OnPolicyKD, SampledBatch, batch_prompts
from distill.recipe import LogitKDConfig
from distill.teachers.live import LiveTeacherSource
from tests.engine.test_accumulation import V, _examples, lm_ctx
from tests.generation.test_engine import lively_llama

PHASE = Phase()


def _batch() -> Batch:
    return collate(_examples(), [[0], [1], [2], [3]], pad_id=0, packing=False)


def _models(seed: int = 1) -> tuple[torch.nn.Module, LiveTeacherSource]:
    student = lively_llama(seed=seed, vocab=V).double()
    teacher = LiveTeacherSource(lively_llama(seed=seed + 10, vocab=V).double(), V)
    return student, teacher


def _grads(method: LogitKD, batches: list[Batch]) -> dict[str, torch.Tensor]:
    student = method.body.lm
    student.zero_grad(set_to_none=True)
    micro = [method.prepare(b, PHASE) for b in batches]
    accumulate_gradients(Accelerator(cpu=True), method, method.modules(), micro)
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def test_lmbda_zero_is_logit_kd_exactly() -> None:
    student, teacher = _models()
    cfg = dict(divergence="jsd", beta=0.3, ce_weight=0.4, temperature=1.5)
    ref = _grads(LogitKD(LogitKDConfig(**cfg), lm_ctx(student, teacher)), [_batch()])  # type: ignore[arg-type]
    got = _grads(OnPolicyKD(OnPolicyConfig(lmbda=0.0, **cfg), lm_ctx(student, teacher)), [_batch()])  # type: ignore[arg-type]
    assert ref.keys() == got.keys() and len(ref) > 5
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_sampled_batch_is_the_students_completion_of_the_same_prompts() -> None:
    student, teacher = _models()
    sample = StudentSamplingConfig(max_new_tokens=7, temperature=0.0)
    method = OnPolicyKD(OnPolicyConfig(lmbda=1.0, sample=sample), lm_ctx(student, teacher))
    method.eos_ids = [2, 3]
    batch = _batch()
    out = method.prepare(batch, PHASE)
    assert isinstance(out, SampledBatch) and out.on_policy
    prompts = batch_prompts(batch)
    assert batch_prompts(out) == prompts
    greedy = generate_tokens(student, prompts, SamplingSpec(0.0), 7, [2, 3], pad_id=0)
    for b, (p, g) in enumerate(zip(prompts, greedy, strict=True)):
        row = out.input_ids[b].tolist()
        assert row[len(p) : len(p) + len(g.tokens)] == g.tokens
        answer = out.targets[b][out.targets[b] != IGNORE].tolist()
        assert answer == g.tokens  # every generated token (EOS included) carries loss, nothing else
    assert out.generated == sum(len(g.tokens) for g in greedy) == method.loss_units(out, PHASE)
    assert out.stats()["generated_tokens"] == out.generated


def test_coins_and_samples_resume_exactly() -> None:
    student, teacher = _models()
    cfg = OnPolicyConfig(lmbda=0.5, sample=StudentSamplingConfig(max_new_tokens=5))
    a = OnPolicyKD(cfg, lm_ctx(student, teacher))
    for _ in range(3):
        a.prepare(_batch(), PHASE)
    state = a.state_dict()
    first = [a.prepare(_batch(), PHASE) for _ in range(6)]
    b = OnPolicyKD(cfg, lm_ctx(student, teacher))
    b.load_state_dict(state)
    second = [b.prepare(_batch(), PHASE) for _ in range(6)]
    kinds = [isinstance(x, SampledBatch) for x in first]
    assert kinds == [isinstance(x, SampledBatch) for x in second] and 0 < sum(kinds) < 6
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x.input_ids, y.input_ids)


def test_drafter_selection_keeps_the_lowest_divergence_tokens() -> None:
    student, teacher = _models()
    method = DrafterKD(DrafterConfig(selective=0.25), lm_ctx(student, teacher, chunk_size=4))
    batch = _batch()
    ctx_modules = {"student": method.body}
    rows = method.student_rows(_ctx(ctx_modules, batch), batch)
    signal = teacher.signal(batch, rows.select)
    keep, kept = method._select_tokens(rows, signal, 0.25, batch)
    n = rows.hidden.shape[0]
    assert len(keep) == n - int(0.25 * n) and kept.num_rows == len(keep)
    logits = (rows.hidden @ rows.weight.T).detach()
    scores = divergence_per_token(logits, signal.logits(0, n), DivergenceSpec(name="tvd"))
    dropped = sorted(set(range(n)) - set(keep.tolist()))
    assert scores[dropped].min() >= scores[keep].max()
    loss, parts = method.loss(_ctx(ctx_modules, batch), batch)
    assert loss.requires_grad and abs(parts["kept_fraction"] - len(keep) / n) < 1e-9


def _ctx(modules: dict, batch: Batch):  # type: ignore[no-untyped-def]
    from distill.methods.base import StepContext

    return StepContext(
        modules=modules,
        normalizer=float(batch.num_loss_tokens),
        phase=PHASE,
        step=0,
        device=torch.device("cpu"),
    )


def test_future_mean_against_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    select = torch.zeros(3, 9, dtype=torch.bool)
    select[0, 2:7] = True
    select[2, 1:4] = True
    select[1, 8] = True
    reward = torch.randn(int(select.sum()), generator=g, dtype=torch.float64)
    for normalize in (True, False):
        got = _future_mean(reward, select, normalize)
        i = 0
        for b in range(3):
            r = reward[i : i + int(select[b].sum())].tolist()
            for t in range(len(r)):
                later = r[t + 1 :]
                want = sum(later) / (len(later) if normalize and later else 1)
                assert abs(float(got[i + t]) - want) < 1e-12
            i += len(r)


def test_minillm_with_the_teacher_as_student_has_zero_loss_and_gradient() -> None:
    student, _ = _models()
    twin = LiveTeacherSource(lively_llama(seed=1, vocab=V).double(), V)
    method = MiniLLM(
        MiniLLMConfig(teacher_mix=0.3, sample=StudentSamplingConfig(max_new_tokens=6)), lm_ctx(student, twin)
    )
    batch = method.prepare(_batch(), PHASE)
    loss, parts = method.loss(_ctx({"student": method.body}, batch), batch)
    assert abs(float(loss.detach())) < 1e-9 and abs(parts["reward"]) < 1e-9
    assert abs(parts["importance_weight"] - 1) < 1e-9
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) < 1e-6  # float64 round-off of large logits


def test_own_sample_kl_is_zero_for_the_teacher_itself_and_positive_for_another_model() -> None:
    from distill.configs.lm_sections import OwnSamplesEvalConfig
    from distill.eval.own_samples import own_sample_metrics

    student, teacher = _models()
    examples = _examples()
    kw = dict(eos_ids=[2, 3], vocab_size=V, pad_id=0, batch_size=3, chunk_size=4)
    cfg = OwnSamplesEvalConfig(max_new_tokens=5)
    same = own_sample_metrics(teacher.model, teacher, examples, cfg, **kw)  # type: ignore[arg-type]
    other = own_sample_metrics(student, teacher, examples, cfg, **kw)  # type: ignore[arg-type]
    assert same["own_tokens"] > 0 and abs(same["own_kl"]) < 1e-9 and same["own_top1_agreement"] == 1.0
    assert other["own_kl"] > 0.01
