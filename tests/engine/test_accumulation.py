"""k micro-batches of B/k give the same gradient as one batch of B (float64, tiny model), and the
loss is normalised per real answer token, not per padded slot."""

import pytest
import torch
from accelerate import Accelerator

from distill.data.batching import collate
from distill.data.tokenize import TokenizedExample
from distill.engine.trainer import accumulate_gradients
from distill.methods.lm.base import LMContext
from distill.methods.lm.cross_entropy import SFTMethod
from distill.methods.lm.logit_kd import LogitKD
from distill.recipe import LogitKDConfig, SFTConfig
from distill.teachers.live import LiveTeacherSource
from tests.conftest import tiny_llama

V = 64


def _examples() -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(1)
    lengths = [12, 5, 9, 17, 7, 11]
    return [
        TokenizedExample(torch.randint(0, V, (n,), generator=g).tolist(), prompt_len=1 + n // 3)
        for n in lengths
    ]


def lm_ctx(student, teacher, chunk_size: int = 5) -> LMContext:  # type: ignore[no-untyped-def]
    return LMContext(student=student, teacher=teacher, vocab_size=V, chunk_size=chunk_size)


def _grads(method_cls, cfg, student, teacher, groups: list[list[int]]) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    exs = _examples()
    student.zero_grad(set_to_none=True)
    method = method_cls(cfg, lm_ctx(student, teacher))
    micro = [collate(exs, [[i] for i in g], pad_id=0, packing=False) for g in groups]
    accumulate_gradients(Accelerator(cpu=True), method, method.modules(), micro)
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_logit_kd_accumulation_invariance(divergence: str) -> None:
    student = tiny_llama(vocab=V, layers=2, dtype=torch.float64, seed=1)
    teacher = LiveTeacherSource(tiny_llama(vocab=V, layers=3, dtype=torch.float64, seed=2), V)
    cfg = LogitKDConfig(divergence=divergence, ce_weight=0.5, temperature=2.0)  # type: ignore[arg-type]
    one = _grads(LogitKD, cfg, student, teacher, [[0, 1, 2, 3, 4, 5]])
    three = _grads(LogitKD, cfg, student, teacher, [[0, 1], [2, 3], [4, 5]])
    uneven = _grads(LogitKD, cfg, student, teacher, [[3], [0, 1, 2, 4], [5]])
    assert one.keys() == three.keys() and len(one) > 5
    for name in one:
        torch.testing.assert_close(three[name], one[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(uneven[name], one[name], atol=1e-6, rtol=0)


def test_cross_entropy_accumulation_invariance_and_padding() -> None:
    student = tiny_llama(vocab=V, layers=2, dtype=torch.float64, seed=1)
    one = _grads(SFTMethod, SFTConfig(), student, None, [[0, 1, 2, 3, 4, 5]])
    two = _grads(SFTMethod, SFTConfig(), student, None, [[0, 5, 3], [1, 2, 4]])
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=0)
