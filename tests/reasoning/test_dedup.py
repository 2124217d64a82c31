"""Deduplication and contamination: golden small cases, the MinHash/LSH path agreeing with exact pairwise
comparison, Jaccard properties (hypothesis), and a contamination check that flags copies but not the
template text every task prompt shares."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.reasoning.dedup import (
    MinHasher,
    contamination,
    deduplicate,
    jaccard,
    lsh_bands,
    word_ngrams,
)
from distill.reasoning.tasks import make_tasks

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
texts_st = st.lists(st.sampled_from(WORDS), max_size=12).map(" ".join)


def test_word_ngrams_golden() -> None:
    assert word_ngrams("The cat  sat. The cat", 2) == {("the", "cat"), ("cat", "sat"), ("sat", "the")}
    assert word_ngrams("Only two", 3) == {("only", "two")}  # shorter than n: one n-gram of all words
    assert word_ngrams("  ", 3) == frozenset()
    a, b = word_ngrams("a b c d", 2), word_ngrams("a b c e", 2)  # {ab, bc, cd} vs {ab, bc, ce}
    assert jaccard(a, b) == pytest.approx(2 / 4)


def test_exact_and_near_golden() -> None:
    base = "first we add the two numbers then we check the sum twice to be sure"
    texts = [
        base,
        "  first we add the two numbers\nthen we check the sum twice to be sure ",  # whitespace only
        base.replace("sure", "certain"),  # 15 words: 12 of 13 trigrams shared, Jaccard 12/14 with base
        "something else entirely different here",
        base,
    ]
    res = deduplicate(texts, exact=True, near_threshold=None)
    assert res.kept == [0, 2, 3] and res.dropped == {1: ("exact", 0), 4: ("exact", 0)}
    jac = jaccard(word_ngrams(texts[0], 3), word_ngrams(texts[2], 3))
    assert jac == pytest.approx(12 / 14)
    res = deduplicate(texts, exact=True, near_threshold=0.8, ngram=3)
    assert res.kept == [0, 3] and res.dropped[2] == ("near", 0)
    assert deduplicate(texts, exact=True, near_threshold=0.9, ngram=3).kept == [0, 2, 3]
    # groups: the same text in two groups is kept in both
    res = deduplicate(texts, near_threshold=0.8, groups=[0, 0, 1, 1, 1])
    assert res.kept == [0, 2, 3] and res.dropped[4] == ("near", 2)
    res = deduplicate(texts, exact=False, near_threshold=None)
    assert res.kept == [0, 1, 2, 3, 4]


def test_lsh_agrees_with_pairwise_on_clear_cases() -> None:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(300)]
    texts: list[str] = []
    for _ in range(60):
        words = rng.sample(vocab, 30)
        texts.append(" ".join(words))
        if rng.random() < 0.5:  # a near copy: one word of 30 replaced (Jaccard ~ 0.8+)
            copy = list(words)
            copy[rng.randrange(30)] = "changed"
            texts.append(" ".join(copy))
    rng.shuffle(texts)
    pair = deduplicate(texts, exact=False, near_threshold=0.7, ngram=2)
    lsh = deduplicate(texts, exact=False, near_threshold=0.7, ngram=2, method="lsh")
    assert len(pair.dropped) > 10
    assert lsh.kept == pair.kept and lsh.dropped == pair.dropped


def test_lsh_bands_catch_pairs_at_the_threshold() -> None:
    for t in (0.3, 0.5, 0.8, 0.95, 1.0):
        bands, rows = lsh_bands(t, 64)
        assert bands * rows <= 64
        assert 1 - (1 - t**rows) ** bands >= 0.995


def test_minhash_estimates_jaccard() -> None:
    hasher = MinHasher(256)
    a = word_ngrams(" ".join(f"w{i}" for i in range(100)), 1)
    b = word_ngrams(" ".join(f"w{i}" for i in range(50, 150)), 1)  # Jaccard 50/150
    sa, sb = hasher.signature(a), hasher.signature(b)
    est = sum(x == y for x, y in zip(sa, sb, strict=True)) / len(sa)
    assert est == pytest.approx(1 / 3, abs=0.1)
    assert MinHasher(256).signature(a) == sa  # fixed seed: the same in every process


@settings(max_examples=60, deadline=None)
@given(text=texts_st, other=texts_st, n=st.integers(1, 4), t=st.floats(0.05, 1.0))
def test_near_duplicate_of_itself_and_symmetric(text: str, other: str, n: int, t: float) -> None:
    a, b = word_ngrams(text, n), word_ngrams(other, n)
    assert jaccard(a, b) == jaccard(b, a)
    assert 0.0 <= jaccard(a, b) <= 1.0
    for method in ("pairwise", "lsh"):
        res = deduplicate([text, other, text], exact=False, near_threshold=t, ngram=n, method=method)  # type: ignore[arg-type]
        assert 2 in res.dropped and res.dropped[2][0] == "near"


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(texts_st, max_size=10), n=st.integers(1, 3))
def test_threshold_one_removes_only_identical_ngram_sets(texts: list[str], n: int) -> None:
    for method in ("pairwise", "lsh"):
        res = deduplicate(texts, exact=False, near_threshold=1.0, ngram=n, method=method)  # type: ignore[arg-type]
        kept_sets = [word_ngrams(texts[i], n) for i in res.kept]
        assert len(set(kept_sets)) == len(kept_sets)
        for i, (why, of) in res.dropped.items():
            assert why == "near" and of in res.kept and of < i
            assert word_ngrams(texts[i], n) == word_ngrams(texts[of], n)


def test_contamination_flags_copies_and_ignores_template_boilerplate() -> None:
    items = make_tasks("units", 60, seed=3)
    prompts = list(dict.fromkeys(it.prompt for it in items))
    heldout, train = prompts[::5], [p for k, p in enumerate(prompts) if k % 5]
    train_grams = set().union(*(word_ngrams(p, 8) for p in train))
    # every held-out prompt shares its instruction line's 8-grams with training: template, not a leak
    assert all(word_ngrams(h, 8) & train_grams for h in heldout)
    clean = contamination(heldout, train, n=8)
    assert clean["heldout_prompts"] == len(heldout)
    assert clean["contaminated"] == 0 and clean["exact_duplicates"] == 0
    leaked = contamination([*heldout, train[4]], train, n=8)
    assert leaked["contaminated"] == 1 and leaked["exact_duplicates"] == 1
    assert leaked["examples"][0]["heldout"] == len(heldout)
    assert leaked["examples"][0]["shared"] == "exact duplicate"
    assert leaked["fraction"] == pytest.approx(1 / (len(heldout) + 1))
    # a held-out problem restated in one training completion (not a prompt copy): flagged by its n-grams
    completions: list[list[str]] = [[] for _ in train]
    completions[7] = [f"This is like: {heldout[0]} So the answer follows."]
    quoted = contamination(heldout, train, completions, n=8)
    assert quoted["contaminated"] == 1 and quoted["exact_duplicates"] == 0
    assert quoted["examples"][0]["heldout"] == 0 and quoted["examples"][0]["overlap"] == 1.0
    # the same text in two training documents is a pattern of the data (boilerplate): ignored
    completions[9] = list(completions[7])
    assert contamination(heldout, train, completions, n=8)["contaminated"] == 0


def test_contamination_golden_small_case() -> None:
    tail = "How many stamps are left? Finish with a line Answer."
    train = [
        f"{name} has {a} stamps and gives {b} away. {tail}" for name, a, b in [("Max", 6, 3), ("Tom", 9, 4)]
    ]
    twin = f"Lily has 6 stamps and gives 3 away. {tail}"  # Max's problem with another name
    other = f"Lily has 8 stamps and gives 5 away. {tail}"
    report = contamination([twin, other], train, n=4)
    # twin's 14 4-grams: the last 7 are boilerplate (in both training prompts); of the other 7, all but
    # "lily has 6 stamps" are in Max's prompt -> overlap 6/7; `other` shares none of its 7
    assert report["contaminated"] == 1 and report["examples"][0]["heldout"] == 0
    assert report["examples"][0]["overlap"] == round(6 / 7, 3)
    assert contamination([twin], train, n=4, min_overlap=0.9)["contaminated"] == 0
