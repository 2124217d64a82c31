"""A served teacher scores the student's own samples: the server receives exactly the prompt + the
student's tokens, and on_policy / minillm take their losses from its top-k answers."""

from __future__ import annotations

import torch

from distill.configs.on_policy import MiniLLMConfig, OnPolicyConfig, StudentSamplingConfig
from distill.data.batching import collate
from distill.data.tokenize import TokenizedExample
from distill.methods.base import Phase, StepContext
from distill.methods.lm.base import LMContext
from distill.methods.lm.minillm import MiniLLM
from distill.methods.lm.on_policy import OnPolicyKD, SampledBatch
from distill.teachers.served_source import ServedTeacherSource
from tests.conftest import tiny_llama
from tests.teachers.test_served import VOCAB, FakeServer, FakeTokenizer, served_cfg


def test_served_teacher_scores_the_students_samples() -> None:
    student = tiny_llama(vocab=VOCAB, layers=1, hidden=16, seed=4)
    exs = [TokenizedExample([1, 40 + i, 50 + i, 60, 70 + i, 80], prompt_len=4) for i in range(3)]
    batch = collate(exs, [[0], [1], [2]], pad_id=2, packing=False)
    sample = StudentSamplingConfig(max_new_tokens=4, temperature=1.0)
    with FakeServer(["ok"] * 50) as fake:
        teacher = ServedTeacherSource(served_cfg(fake.url), tokenizer=FakeTokenizer())
        try:
            for method in (
                OnPolicyKD(OnPolicyConfig(lmbda=1.0, sample=sample), _ctx(student, teacher)),
                MiniLLM(MiniLLMConfig(teacher_mix=0.0, sample=sample), _ctx(student, teacher)),
            ):
                fake.requests.clear()
                sampled = method.prepare(batch, Phase())
                assert isinstance(sampled, SampledBatch) and sampled.generated > 0
                step = StepContext(
                    modules={"student": method.body},
                    normalizer=float(sampled.num_loss_tokens),
                    phase=Phase(),
                    step=0,
                    device=torch.device("cpu"),
                )
                loss, parts = method.loss(step, sampled)
                assert torch.isfinite(loss) and loss.requires_grad
                sent = sorted(tuple(p["prompt"]) for _, p in fake.requests)
                rows = sorted(
                    tuple(sampled.input_ids[b, : int(sampled.attention_mask[b].sum())].tolist())  # type: ignore[index]
                    for b in range(3)
                )
                assert sent == rows  # each request is one row: prompt + the student's own tokens
        finally:
            teacher.close()


def _ctx(student: torch.nn.Module, teacher: ServedTeacherSource) -> LMContext:
    return LMContext(student=student, teacher=teacher, vocab_size=VOCAB, chunk_size=8)  # type: ignore[arg-type]
