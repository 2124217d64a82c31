"""Held-out evaluation with `teacher_memo`: the teacher runs once for any number of students, and every
number is bit-identical to an evaluation without the memo (prefix cache on and off)."""

from __future__ import annotations

import pytest
import torch

from distill.data.tokenize import TokenizedExample
from distill.eval.metrics import evaluate
from distill.teachers.live import LiveTeacherSource
from tests.conftest import tiny_llama

V = 64


def _examples() -> list[TokenizedExample]:
    """Rows sharing a chat-like header (so the prefix cache applies), of different lengths."""
    g = torch.Generator().manual_seed(3)
    head = [1, 5, 6, 7, 8, 9]
    return [
        TokenizedExample(head + torch.randint(10, V, (n,), generator=g).tolist(), prompt_len=len(head) + 2)
        for n in (7, 12, 4, 9, 15, 6, 10)
    ]


def _layer_calls(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.model.layers[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))  # type: ignore[union-attr, index]
    return calls


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_memo_scores_the_teacher_once_and_changes_no_number(prefix_cache: bool) -> None:
    teacher = LiveTeacherSource(tiny_llama(vocab=V, layers=2, seed=2), V, prefix_cache=prefix_cache)
    students = [tiny_llama(vocab=V, layers=1, seed=s).eval() for s in (4, 5, 6)]
    examples = _examples()
    kw = dict(vocab_size=V, pad_id=0, batch_size=3, chunk_size=4)
    plain = [evaluate(s, teacher, examples, **kw) for s in students]  # type: ignore[arg-type]
    calls = _layer_calls(teacher.model)
    memo: dict[tuple[int, ...], torch.Tensor] = {}
    first = evaluate(students[0], teacher, examples, teacher_memo=memo, **kw)  # type: ignore[arg-type]
    after_first = calls[0]
    rest = [evaluate(s, teacher, examples, teacher_memo=memo, **kw) for s in students[1:]]  # type: ignore[arg-type]
    assert after_first > 0 and calls[0] == after_first  # later students reuse the teacher's states
    assert len(memo) == 3 and all(t.device.type == "cpu" for t in memo.values())
    assert [first, *rest] == plain  # every number, bit for bit (dict equality compares floats exactly)
    assert plain[0]["kl"] != plain[1]["kl"]  # the students differ, so equality above is not vacuous


def test_memo_keys_tell_batches_apart() -> None:
    """Two example sets with the same indices but other tokens are not confused by the memo."""
    teacher = LiveTeacherSource(tiny_llama(vocab=V, layers=2, seed=2), V, prefix_cache=False)
    student = tiny_llama(vocab=V, layers=1, seed=4).eval()
    a = _examples()
    b = [
        TokenizedExample([t if t < 10 else (t * 7) % (V - 10) + 10 for t in e.input_ids], e.prompt_len)
        for e in a
    ]
    kw = dict(vocab_size=V, pad_id=0, batch_size=3, chunk_size=4)
    memo: dict[tuple[int, ...], torch.Tensor] = {}
    evaluate(student, teacher, a, teacher_memo=memo, **kw)  # type: ignore[arg-type]
    got = evaluate(student, teacher, b, teacher_memo=memo, **kw)  # type: ignore[arg-type]
    assert got == evaluate(student, teacher, b, **kw)  # type: ignore[arg-type]
    assert len(memo) == 6
