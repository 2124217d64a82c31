"""The preallocated K/V cache gives the logits transformers' own cache gives, through every operation the
generation code uses: prompt, one-token steps, a shared prefix expanded to a batch, rows leaving the batch,
rollback (`crop`) and growth past the reserved room."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from distill.generation.engine import cache_keyword
from distill.generation.growing_cache import GrowingLayer, growing_cache
from tests.conftest import tiny_llama


def _step(model: torch.nn.Module, cache: DynamicCache, ids: torch.Tensor) -> torch.Tensor:
    logits: torch.Tensor = model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache}).logits
    return logits


def test_growing_cache_matches_dynamic_cache_through_every_operation() -> None:
    model = tiny_llama(vocab=97, layers=2).eval()
    torch.manual_seed(1)
    ours = growing_cache(model.config, reserve=3)  # small room: writes must regrow it several times
    assert all(isinstance(layer, GrowingLayer) for layer in ours.layers)
    theirs = DynamicCache(config=model.config)
    schedule = [
        ("feed", torch.randint(0, 97, (1, 5))),
        ("repeat", 4),
        ("feed", torch.randint(0, 97, (4, 3))),
        *[("feed", torch.randint(0, 97, (4, 1))) for _ in range(6)],
        ("crop", 2),
        ("feed", torch.randint(0, 97, (4, 2))),
        ("select", torch.tensor([0, 2, 3])),
        *[("feed", torch.randint(0, 97, (3, 1))) for _ in range(5)],
        ("crop", 4),
        ("feed", torch.randint(0, 97, (3, 7))),
    ]
    with torch.no_grad():
        for op, arg in schedule:
            if op == "feed":
                assert isinstance(arg, torch.Tensor)
                torch.testing.assert_close(
                    _step(model, ours, arg), _step(model, theirs, arg), rtol=0, atol=1e-6
                )
            elif op == "repeat":
                ours.batch_repeat_interleave(int(arg))  # type: ignore[call-overload]
                theirs.batch_repeat_interleave(int(arg))  # type: ignore[call-overload]
            elif op == "select":
                assert isinstance(arg, torch.Tensor)
                ours.batch_select_indices(arg)
                theirs.batch_select_indices(arg)
            else:
                ours.crop(-int(arg))  # type: ignore[call-overload]
                theirs.crop(-int(arg))  # type: ignore[call-overload]
            assert ours.get_seq_length() == theirs.get_seq_length()
    for mine, ref in zip(ours.layers, theirs.layers, strict=True):
        torch.testing.assert_close(mine.keys, ref.keys, rtol=0, atol=0)
        torch.testing.assert_close(mine.values, ref.values, rtol=0, atol=0)


def test_a_decode_step_writes_into_spare_room_without_copying_the_cache() -> None:
    layer = GrowingLayer(reserve=8)
    k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    keys, _ = layer.update(k, v)
    start = keys.data_ptr()
    for _ in range(8):
        keys, values = layer.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))
        assert keys.data_ptr() == start  # a view of the same buffer: nothing was copied or reallocated
    assert keys.shape == values.shape == (2, 3, 13, 4)
    torch.testing.assert_close(keys[:, :, :5], k, rtol=0, atol=0)
    layer.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))  # past the room: regrown, values kept
    torch.testing.assert_close(layer.keys[:, :, :5], k, rtol=0, atol=0)
    assert layer.get_seq_length() == 14
