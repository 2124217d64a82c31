"""Held-out KL goes through losses/ (the training loss's log-prob floor): a teacher that rules tokens out
with -inf logits gives finite evaluation numbers, equal to the divergence reference."""

from __future__ import annotations

import math

import torch

from distill.data.batching import IGNORE, collate
from distill.data.tokenize import TokenizedExample
from distill.eval.metrics import evaluate
from distill.losses.tokens import DivergenceSpec, divergence_per_token
from distill.models.body import batch_hidden
from distill.teachers.base import TeacherSignal
from distill.teachers.live import LiveTeacherSource
from tests.conftest import tiny_llama

V = 64


class MaskedTeacher(LiveTeacherSource):
    """A live teacher whose logits are -inf on the upper half of the vocabulary."""

    def signal(self, batch, select):  # type: ignore[no-untyped-def]
        inner = super().signal(batch, select)

        def logits(start: int, end: int) -> torch.Tensor:
            out = inner.logits(start, end).clone()
            out[:, V // 2 :] = -math.inf
            return out

        return TeacherSignal(logits=logits, num_rows=inner.num_rows, vocab_size=V)


def test_teacher_with_minus_inf_logits_gives_finite_eval() -> None:
    student = tiny_llama(vocab=V, layers=1, seed=1).eval()
    teacher = MaskedTeacher(tiny_llama(vocab=V, layers=2, seed=2), V, prefix_cache=False)
    g = torch.Generator().manual_seed(0)
    examples = [
        TokenizedExample(torch.randint(0, V // 2, (n,), generator=g).tolist(), prompt_len=2)
        for n in (9, 6, 12)
    ]
    out = evaluate(student, teacher, examples, vocab_size=V, pad_id=0, batch_size=2, chunk_size=4)
    for key in ("kl", "reverse_kl", "top1_agreement", "student_nll"):
        assert math.isfinite(out[key]), key
    assert out["reverse_kl"] > 10  # the student puts mass where the teacher has none: large, finite
    batch = collate(examples, [[0], [1], [2]], pad_id=0, packing=False)
    select = batch.targets != IGNORE
    with torch.no_grad():
        s_logits = student.lm_head(batch_hidden(student, batch)[select])
        t_logits = teacher.signal(batch, select).logits(0, int(select.sum()))
    ref = divergence_per_token(s_logits.double(), t_logits.double(), DivergenceSpec(name="reverse_kl")).mean()
    assert abs(out["reverse_kl"] - float(ref)) < 1e-3 * float(ref)
