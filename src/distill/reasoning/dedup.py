"""Duplicate and contamination checks on text, as pure functions.

Near-duplicates are measured by the Jaccard similarity of word n-gram sets. Within a small group (the
samples of one prompt) every pair is compared exactly; across a whole data set, MinHash signatures (a
fixed-seed family of hash permutations, so results are the same in every process) banded into LSH buckets
find the candidate pairs, and each candidate is confirmed with the exact Jaccard: no false positives, and a
pair at the threshold is missed with probability < 0.5 %.

Contamination (PaLM's rule - a held-out item is contaminated when most of its 8-grams occur in the
training data - adapted to template prompts): task prompts are made from templates, so their instruction
text recurs in every prompt. An n-gram found in two or more distinct training documents (a training prompt
with its kept completions) is a pattern of the prompt distribution, not a copy of one item: it is ignored.
A held-out prompt is contaminated when at least `min_overlap` of its remaining n-grams occur in the
training documents, or when it is an exact copy of a training prompt (reported separately too). A single
shared n-gram is not enough: a template with two filled-in values ("2 stamps and gets 8 more how many")
matches some other item by chance in any sizeable task set.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

_WORD = re.compile(r"\w+")
_PRIME = (1 << 61) - 1  # Mersenne prime modulus of the permutation family
_EMPTY = _PRIME  # signature entry of an empty n-gram set (no element hashes to it)


def normalise(text: str) -> str:
    """Whitespace collapsed: what the exact-duplicate check compares."""
    return " ".join(text.split())


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def word_ngrams(text: str, n: int) -> frozenset[tuple[str, ...]]:
    """The set of lower-cased word n-grams; a text shorter than `n` words is one n-gram of all its words
    (so short texts can still match), an empty text the empty set."""
    ws = words(text)
    if len(ws) < n:
        return frozenset([tuple(ws)]) if ws else frozenset()
    return frozenset(tuple(ws[i : i + n]) for i in range(len(ws) - n + 1))


def jaccard(a: frozenset[Any], b: frozenset[Any]) -> float:
    """|a & b| / |a | b|; two empty sets are identical (1.0)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def gram_hash(gram: tuple[str, ...]) -> int:
    """A 64-bit hash of an n-gram that is the same in every process (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b("\x1f".join(gram).encode(), digest_size=8).digest(), "little")


class MinHasher:
    """MinHash signatures under `num_perm` universal hash permutations (a*x + b) mod p drawn from a fixed
    seed: two sets' signatures agree at one position with probability equal to their Jaccard similarity."""

    def __init__(self, num_perm: int = 64, seed: int = 0x5EED) -> None:
        rng = random.Random(seed)
        self.params = [(rng.randrange(1, _PRIME), rng.randrange(0, _PRIME)) for _ in range(num_perm)]

    def signature(self, grams: frozenset[tuple[str, ...]]) -> tuple[int, ...]:
        xs = [gram_hash(g) for g in grams]
        if not xs:
            return (_EMPTY,) * len(self.params)
        return tuple(min((a * x + b) % _PRIME for x in xs) for a, b in self.params)


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) with bands * rows <= num_perm: the most rows per band (fewest spurious
    candidates) that still make a pair at `threshold` a candidate with probability >= 99.5 %."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= 0.995:
            best = (bands, rows)
    return best


@dataclass(frozen=True)
class DedupResult:
    """Which items survive, and for each dropped one why ("exact" or "near") and which kept item it
    repeats."""

    kept: list[int]
    dropped: dict[int, tuple[str, int]] = field(default_factory=dict)


def deduplicate(
    texts: Sequence[str],
    *,
    exact: bool = True,
    near_threshold: float | None = None,
    ngram: int = 3,
    groups: Sequence[Hashable] | None = None,
    method: Literal["pairwise", "lsh"] = "pairwise",
    num_perm: int = 64,
) -> DedupResult:
    """Greedy deduplication in list order (earlier items win): an item is dropped when it equals (after
    whitespace normalisation) or is near (Jaccard >= `near_threshold`) an earlier kept item of its group.
    `groups[i]` names item i's group (None: all one group); `method` picks exact pairwise comparison or
    MinHash LSH candidates (confirmed exactly)."""
    group_of: Sequence[Hashable] = groups if groups is not None else [0] * len(texts)
    if len(group_of) != len(texts):
        raise ValueError("groups must give one group per text")
    dropped: dict[int, tuple[str, int]] = {}
    survivors = list(range(len(texts)))
    if exact:
        first: dict[tuple[Hashable, str], int] = {}
        for i in survivors:
            key = (group_of[i], normalise(texts[i]))
            if key in first:
                dropped[i] = ("exact", first[key])
            else:
                first[key] = i
        survivors = [i for i in survivors if i not in dropped]
    if near_threshold is not None:
        grams = {i: word_ngrams(texts[i], ngram) for i in survivors}
        near = _near_duplicates(survivors, grams, group_of, near_threshold, method, num_perm)
        dropped.update({i: ("near", j) for i, j in near.items()})
    return DedupResult([i for i in range(len(texts)) if i not in dropped], dropped)


def _near_duplicates(
    items: list[int],
    grams: dict[int, frozenset[tuple[str, ...]]],
    group_of: Sequence[Hashable],
    threshold: float,
    method: str,
    num_perm: int,
) -> dict[int, int]:
    """Greedy in list order: item i's match is the earliest of its candidates with Jaccard >= `threshold`;
    unmatched items are kept. Candidates are kept items sharing a bucket with i: one bucket per group
    ("pairwise": all of the group), or one per group and LSH band (merged back into list order)."""
    if method == "pairwise":

        def keys_of(i: int) -> list[Hashable]:
            return [group_of[i]]

    else:
        hasher = MinHasher(num_perm)
        bands, rows = lsh_bands(threshold, num_perm)

        def keys_of(i: int) -> list[Hashable]:
            sig = hasher.signature(grams[i])
            return [(group_of[i], b, sig[b * rows : (b + 1) * rows]) for b in range(bands)]

    buckets: dict[Hashable, list[int]] = {}
    rank = {i: r for r, i in enumerate(items)}
    out: dict[int, int] = {}
    for i in items:
        keys = keys_of(i)
        found = [j for key in keys for j in buckets.get(key, ())]
        candidates = sorted(set(found), key=rank.__getitem__) if len(keys) > 1 else found
        match = next((j for j in candidates if jaccard(grams[i], grams[j]) >= threshold), None)
        if match is None:
            for key in keys:
                buckets.setdefault(key, []).append(i)
        else:
            out[i] = match
    return out


def contamination(
    heldout: Sequence[str],
    train_prompts: Sequence[str],
    train_completions: Sequence[Sequence[str]] | None = None,
    *,
    n: int = 8,
    min_overlap: float = 0.5,
    examples: int = 5,
) -> dict[str, Any]:
    """How many held-out prompts have at least `min_overlap` of their non-boilerplate `n`-grams in the
    training prompts or their kept completions (`train_completions[i]` belongs to `train_prompts[i]`), or
    are an exact copy of a training prompt (counted as contaminated and, separately, in
    `exact_duplicates`). See the module docstring for what counts as boilerplate."""
    completions = train_completions if train_completions is not None else [[] for _ in train_prompts]
    if len(completions) != len(train_prompts):
        raise ValueError("train_completions must give one list per training prompt")
    once: set[int] = set()
    many: set[int] = set()
    for prompt, outs in zip(train_prompts, completions, strict=True):
        doc = set(map(gram_hash, word_ngrams(prompt, n)))
        for text in outs:
            doc |= set(map(gram_hash, word_ngrams(text, n)))
        many |= doc & once
        once |= doc
    seen = {normalise(p) for p in train_prompts}
    found: list[dict[str, Any]] = []
    contaminated = exact_copies = 0
    for k, prompt in enumerate(heldout):
        own = {gram_hash(g): g for g in word_ngrams(prompt, n)}
        content = [h for h in own if h not in many]
        shared = sorted(own[h] for h in content if h in once)
        overlap = len(shared) / len(content) if content else 0.0
        is_copy = normalise(prompt) in seen
        exact_copies += is_copy
        if is_copy or (content and overlap >= min_overlap):
            contaminated += 1
            if len(found) < examples:
                why = "exact duplicate" if is_copy else " ".join(shared[0])
                found.append(
                    {"heldout": k, "prompt": prompt[:200], "overlap": round(overlap, 3), "shared": why}
                )
    total = len(heldout)
    return {
        "ngram": n,
        "min_overlap": min_overlap,
        "heldout_prompts": total,
        "contaminated": contaminated,
        "fraction": contaminated / total if total else 0.0,
        "exact_duplicates": exact_copies,
        "boilerplate": "n-grams in >= 2 distinct training prompts (with their completions) are ignored",
        "examples": found,
    }
