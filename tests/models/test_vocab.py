"""Vocabulary checks: padded heads over one tokenizer are sliced to the real vocabulary; different
tokenizers are rejected with one line naming the cross-tokenizer option."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from distill.data.batching import collate
from distill.data.tokenize import TokenizedExample
from distill.errors import CompatibilityError
from distill.methods.base import Phase, StepContext
from distill.methods.lm.base import LMContext
from distill.methods.lm.logit_kd import LogitKD
from distill.models.loading import shared_vocab
from distill.recipe import LogitKDConfig
from distill.teachers.live import LiveTeacherSource
from tests.conftest import tiny_llama


def test_padded_teacher_head_is_sliced(smol_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    teacher = tiny_llama(vocab=49152 + 128, layers=2, seed=3)  # padded like Qwen's 151936 -> 152064
    student = tiny_llama(vocab=49152, layers=1)
    vocab = shared_vocab(tok, teacher, student, tok)
    assert vocab == len(tok) == 49152
    batch = collate([TokenizedExample(list(range(100, 120)), prompt_len=5)], [[0]], pad_id=0, packing=False)
    method = LogitKD(
        LogitKDConfig(), LMContext(student, LiveTeacherSource(teacher, vocab), vocab, chunk_size=4)
    )
    ctx = StepContext(
        modules=method.modules(), normalizer=15.0, phase=Phase(), step=0, device=torch.device("cpu")
    )
    loss, parts = method.loss(ctx, batch)
    assert torch.isfinite(loss) and parts["kd"] > 0
    loss.backward()


def test_different_tokenizers_are_rejected(smol_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    other = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    other.add_tokens(["<an_extra_token>"])
    with pytest.raises(CompatibilityError, match="cross-tokenizer") as err:
        shared_vocab(tok, tiny_llama(), tiny_llama(vocab=49153), other)
    assert "\n" not in str(err.value)


def test_head_smaller_than_tokenizer_is_rejected(smol_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    with pytest.raises(CompatibilityError, match="smaller than the tokenizer"):
        shared_vocab(tok, tiny_llama(vocab=49000), tiny_llama(), tok)
