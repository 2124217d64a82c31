"""The teacher's shared-prefix cache gives the plain forward's hidden states, and steps aside when unsure."""

from __future__ import annotations

import warnings

import pytest
import torch

from distill.data.batching import IGNORE, collate
from distill.data.tokenize import TokenizedExample
from distill.models.body import batch_hidden
from distill.teachers.live import LiveTeacherSource
from distill.teachers.prefix_cache import PrefixCache, shared_prefix_length
from tests.conftest import tiny_llama

V = 64
HEADER = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]  # 10 shared tokens (a chat header / system prompt)


def _example(tail: list[int], answer: int = 3) -> TokenizedExample:
    ids = HEADER + tail
    return TokenizedExample(input_ids=ids, prompt_len=len(ids) - answer)


EXAMPLES = [
    _example([20, 21, 22, 23, 24, 25]),
    _example([30, 31, 32, 33]),
    _example([40, 41, 42, 43, 44, 45, 46, 47, 48]),
]


def _batch(packing: bool = False, rows: list[list[int]] | None = None):  # type: ignore[no-untyped-def]
    return collate(EXAMPLES, rows or [[0], [1], [2]], 0, packing=packing, pad_to_multiple=1)


def test_shared_prefix_length() -> None:
    assert shared_prefix_length(_batch()) == len(HEADER)
    assert shared_prefix_length(_batch(packing=True, rows=[[0, 1], [2]])) == 0  # packed: never
    one = _batch(rows=[[2]])
    assert shared_prefix_length(one) == one.input_ids.shape[1]


def test_hidden_states_equal_the_plain_forward() -> None:
    model = tiny_llama(vocab=V, layers=3, dtype=torch.float64, seed=1).eval()
    cache = PrefixCache(model, min_tokens=4)
    with torch.no_grad():
        for rows in ([[0], [1], [2]], [[2], [0]], [[1]]):
            batch = _batch(rows=rows)
            got, want = cache.hidden(batch), batch_hidden(model, batch)
            real = batch.attention_mask.bool()
            torch.testing.assert_close(got[real], want[real], rtol=1e-10, atol=1e-10)
    assert cache.enabled and cache.verified
    assert len(cache.entries) == 1  # one header, computed once, reused by every batch
    assert cache.tokens_saved > 0


def test_live_teacher_signal_is_unchanged() -> None:
    model = tiny_llama(vocab=V, layers=2, dtype=torch.float64, seed=2)
    batch = _batch()
    select = batch.targets != IGNORE
    with_cache = LiveTeacherSource(model, V).signal(batch, select)
    without = LiveTeacherSource(model, V, prefix_cache=False).signal(batch, select)
    n = with_cache.num_rows
    torch.testing.assert_close(with_cache.logits(0, n), without.logits(0, n), rtol=1e-10, atol=1e-10)


def test_a_cache_that_disagrees_switches_itself_off() -> None:
    model = tiny_llama(vocab=V, layers=2, dtype=torch.float64, seed=3).eval()
    cache = PrefixCache(model, min_tokens=4)
    real_with_prefix = cache._with_prefix
    cache._with_prefix = lambda batch, plen: real_with_prefix(batch, plen) + 1.0  # type: ignore[method-assign]
    batch = _batch()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="prefix cache off"):
        got = cache.hidden(batch)
    torch.testing.assert_close(got, batch_hidden(model, batch))
    assert not cache.enabled and not cache.entries
    with torch.no_grad():
        torch.testing.assert_close(cache.hidden(batch), batch_hidden(model, batch))  # plain from now on


def test_short_prefixes_and_packed_batches_run_plain() -> None:
    model = tiny_llama(vocab=V, layers=2, dtype=torch.float64, seed=4).eval()
    cache = PrefixCache(model, min_tokens=len(HEADER) + 1)
    with torch.no_grad():
        cache.hidden(_batch())
        cache.hidden(_batch(packing=True, rows=[[0, 1], [2]]))
    assert not cache.entries and cache.tokens_saved == 0


def test_split_depends_on_the_batch_alone() -> None:
    """Single rows run plain, and a batch gives the same bits whatever earlier batches cached (a resumed
    run must compute what the uninterrupted one did)."""
    model = tiny_llama(vocab=V, layers=2, dtype=torch.float32, seed=5).eval()
    fresh, warmed = PrefixCache(model, min_tokens=4), PrefixCache(model, min_tokens=4)
    # rows 0 and 1 share the header and 4 more tokens; row 2 only the header
    examples = [_example([20, 21, 22, 23, 24, 25]), _example([20, 21, 22, 23, 34]), EXAMPLES[2]]

    def batch(rows: list[list[int]]):  # type: ignore[no-untyped-def]
        return collate(examples, rows, 0, packing=False, pad_to_multiple=1)

    with torch.no_grad():
        assert torch.equal(warmed.hidden(batch([[2]])), batch_hidden(model, batch([[2]])))
        assert not warmed.entries and warmed.tokens_saved == 0
        warmed.hidden(batch([[0], [2]]))  # caches the header alone
        assert torch.equal(warmed.hidden(batch([[0], [1]])), fresh.hidden(batch([[0], [1]])))
    assert len(warmed.entries) == 2


def test_capacity_bounds_the_entries() -> None:
    model = tiny_llama(vocab=V, layers=2, dtype=torch.float64, seed=5).eval()
    cache = PrefixCache(model, min_tokens=4, capacity=2)
    with torch.no_grad():
        for first in (60, 61, 62):  # three different shared prefixes
            examples = [
                TokenizedExample([first, *HEADER, 20 + i, 30], prompt_len=len(HEADER) + 1) for i in range(2)
            ]
            cache.hidden(collate(examples, [[0], [1]], 0, packing=False, pad_to_multiple=1))
    assert len(cache.entries) == 2


def _tiny(arch: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(6)
    cfg = AutoConfig.for_model(
        arch,
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        head_dim=8,
    )
    return AutoModelForCausalLM.from_config(cfg).to(torch.float64).eval()


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma2", "phi3"])
def test_other_architectures_match_or_step_aside(arch: str) -> None:
    """Whatever a family does with caches, the hidden states equal the plain forward: either the prefix
    cache reproduces them (and is kept), or it turns itself off and runs plain."""
    model = _tiny(arch)
    cache = PrefixCache(model, min_tokens=4)
    batch = _batch()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got, want = cache.hidden(batch), batch_hidden(model, batch)  # type: ignore[arg-type]
    real = batch.attention_mask.bool()
    # some families compute norms in float32 even for float64 weights (gemma2): float32-level agreement
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-6)
    assert cache.verified or not cache.enabled


def test_entries_are_dropped_when_the_weights_change() -> None:
    model = tiny_llama(vocab=V, layers=2, dtype=torch.float64, seed=7).eval()
    cache = PrefixCache(model, min_tokens=4)
    batch = _batch()
    with torch.no_grad():
        cache.hidden(batch)
        assert len(cache.entries) == 1
        for p in model.parameters():
            p.mul_(1.01)  # e.g. an EMA update of the teacher
        got = cache.hidden(batch)
    real = batch.attention_mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(got[real], batch_hidden(model, batch)[real], rtol=1e-10, atol=1e-10)
