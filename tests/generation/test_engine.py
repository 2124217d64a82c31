"""The generation engine: greedy output equals HF `generate` (shared prefix or not, rows finishing at
different steps), sampling is reproducible by generator and follows the sampling spec, savings counted."""

from __future__ import annotations

import torch

from distill.generation.engine import GenerationStats, generate_tokens, shared_prefix
from distill.generation.sampling import SamplingSpec
from tests.conftest import tiny_llama

EOS = [2, 3]


def lively_llama(seed: int = 3, vocab: int = 64) -> torch.nn.Module:
    """A tiny random Llama whose weights are scaled up, so its greedy continuations vary (the default
    init repeats one token) and EOS comes at different steps for different prompts."""
    model = tiny_llama(vocab=vocab, layers=2, hidden=32, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(12.0)
    return model.eval()


def _prompts(n: int = 9, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    head = [1, 7, 8, 9, 10, 11]  # the chat header every prompt shares
    return [
        head + torch.randint(12, 60, (int(k),), generator=g).tolist()
        for k in torch.randint(1, 9, (n,), generator=g)
    ]


def _hf_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    out = model.generate(  # type: ignore[operator]
        input_ids=torch.tensor([prompt]),
        max_new_tokens=steps,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    for i, t in enumerate(out):  # HF pads after the EOS
        if t in EOS:
            return out[: i + 1]
    return out


def test_greedy_equals_hf_generate_with_and_without_the_shared_prefix() -> None:
    model = lively_llama()
    prompts = _prompts()
    refs = [_hf_greedy(model, p, 16) for p in prompts]
    assert len({tuple(r) for r in refs}) > 3, "the test model must not repeat one continuation"
    assert any(len(r) < 16 for r in refs), "some row must finish early on EOS"
    for use_prefix in (True, False):
        stats = GenerationStats()
        got = generate_tokens(
            model,
            prompts,
            SamplingSpec(0.0),
            16,
            EOS,
            pad_id=0,
            batch_size=4,
            use_shared_prefix=use_prefix,
            stats=stats,
        )
        assert [g.tokens for g in got] == refs
        assert [g.finished for g in got] == [r[-1] in EOS for r in refs]
        assert (stats.prefix_tokens_saved > 0) == use_prefix
        assert stats.row_steps_saved > 0


def test_shared_prefix_leaves_each_prompt_a_token() -> None:
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix([[4, 2], [1, 2]]) == 0


def test_sampling_is_reproducible_and_respects_top_k() -> None:
    model = lively_llama(seed=5)
    prompts = _prompts(6, seed=1)
    spec = SamplingSpec(temperature=1.0, top_k=1)  # top-k 1 is greedy whatever the draw
    greedy = generate_tokens(model, prompts, SamplingSpec(0.0), 10, EOS, pad_id=0)
    topk1 = generate_tokens(
        model, prompts, spec, 10, EOS, pad_id=0, generator=torch.Generator().manual_seed(0)
    )
    assert [g.tokens for g in topk1] == [g.tokens for g in greedy]
    hot = SamplingSpec(temperature=1.5)
    a = generate_tokens(model, prompts, hot, 10, EOS, pad_id=0, generator=torch.Generator().manual_seed(1))
    b = generate_tokens(model, prompts, hot, 10, EOS, pad_id=0, generator=torch.Generator().manual_seed(1))
    c = generate_tokens(model, prompts, hot, 10, EOS, pad_id=0, generator=torch.Generator().manual_seed(2))
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]


def test_stats_time_prefill_and_decode_and_plain_decoding_reads_them() -> None:
    """The speculative baseline (`generate_plain`) is the engine: its counts and seconds come from the
    engine's stats, and `vocab` keeps every token inside the tokenizer's ids."""
    from distill.generation.speculative import generate_plain

    model = lively_llama(seed=7)
    prompt = _prompts(1, seed=4)[0]
    stats = GenerationStats()
    [row] = generate_tokens(model, [prompt], SamplingSpec(0.0), 9, [], pad_id=0, stats=stats)
    assert len(row.tokens) == 9 == stats.new_tokens
    assert stats.decode_calls == 8 and stats.forward_calls == 9
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0
    plain = generate_plain(model, [prompt], SamplingSpec(0.0), 9)
    assert plain.tokens == [row.tokens]
    s = plain.stats
    assert (s.new_tokens, s.target_calls, s.decode_calls) == (9, 9, 8)
    assert 0 < s.prefill_seconds + s.decode_seconds <= s.total_seconds
    cut = generate_tokens(model, _prompts(4), SamplingSpec(1.0), 12, [], pad_id=0, vocab=20,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert all(t < 20 for r in cut for t in r.tokens)
    assert generate_tokens(model, [prompt], SamplingSpec(0.0), 0, [], pad_id=0)[0].tokens == []
