"""(query, passage) pairs for reranker distillation: read, mined for hard negatives by the teacher, and
streamed as resumable batches of candidate lists (column 0 the labelled positive, then the negatives).

Passages are kept once per distinct text, so a passage shared by two queries is one candidate id and is
never drawn as a negative of a query it is the positive of. Hard negatives are the training passages the
teacher scores highest for a query other than its positive; some of them are relevant too (false
negatives), which Margin-MSE tolerates: it learns the teacher's (small) margin, not "negative = 0".
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from distill.classifier.batches import TensorStream
from distill.data.records import read_jsonl
from distill.errors import InputError

FIELDS = ("query", "passage")


@dataclass
class Pairs:
    queries: list[str]
    passages: list[str]  # distinct texts
    positive: torch.Tensor  # (Q,) the passage id of each query's labelled positive


def read_pairs(path: Path, name: str) -> Pairs:
    """JSON lines with non-empty "query" and "passage" strings; errors name the field, file and line."""
    if path.suffix not in (".jsonl", ".json"):
        raise InputError(f'{name}: {path}: reranking pairs are JSON lines of {{"query", "passage"}}')
    queries: list[str] = []
    passages: list[int] = []
    ids: dict[str, int] = {}
    try:
        for where, row in read_jsonl(path):
            for key in FIELDS:
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise InputError(f"{where} has no text under {key!r} (a reranking pair)")
            queries.append(row["query"])
            passages.append(ids.setdefault(row["passage"], len(ids)))
    except InputError as err:
        raise InputError(f"{name}: {err}") from None
    if len(ids) < 2:
        raise InputError(f"{name}: {path} holds {len(ids)} distinct passage(s); at least 2 are needed")
    return Pairs(queries, list(ids), torch.tensor(passages, dtype=torch.long))


def check_disjoint(train: Pairs, held: Pairs) -> None:
    """Held-out queries and passages must not occur in training (one line naming the first)."""
    seen_q, seen_p = set(train.queries), set(train.passages)
    for kind, texts, seen in (("query", held.queries, seen_q), ("passage", held.passages, seen_p)):
        shared = [t for t in texts if t in seen]
        if shared:
            raise InputError(
                f"data.heldout: {len(shared)} held-out {kind} text(s) also occur in data.train "
                f"(first: {shared[0][:60]!r}); the split must be disjoint"
            )


def unit_scores(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``(Q, P)`` of two embedding matrices."""
    q, p = (torch.nn.functional.normalize(e.float(), dim=-1) for e in (queries, passages))
    return q @ p.T


def mine_hard_negatives(scores: torch.Tensor, positive: torch.Tensor, depth: int) -> torch.Tensor:
    """``(Q, depth)`` passage ids: per query, the teacher's highest-scored passages except its positive."""
    masked = scores.clone()
    masked[torch.arange(scores.shape[0]), positive] = -float("inf")
    return masked.topk(depth, dim=1).indices


@dataclass
class RerankBatch:
    query: torch.Tensor  # (B,) query rows
    candidates: torch.Tensor  # (B, C) passage ids; column 0 the positive
    tokens: dict[
        str, torch.Tensor
    ]  # bi: q_ids, q_mask, p_ids, p_mask, p_index (B, C); cross: ids, mask, types
    teacher: torch.Tensor | None = None  # (B, C) the teacher's scores, filled in the method's preparation
    padded: dict[str, float] = field(default_factory=dict)

    def to(self, device: torch.device) -> RerankBatch:
        moved = {k: v.to(device) for k, v in self.tokens.items()}
        teacher = None if self.teacher is None else self.teacher.to(device)
        return RerankBatch(self.query.to(device), self.candidates.to(device), moved, teacher, self.padded)

    def stats(self) -> dict[str, float]:
        return {"samples": float(self.query.shape[0]), "pairs": float(self.candidates.numel()), **self.padded}


def tokenise_pairs(
    tokenizer: PreTrainedTokenizerBase, queries: list[str], passages: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    """ "[CLS] query [SEP] passage [SEP]" rows (ids, mask, token types), longest-first truncation to
    `max_length` as sentence-transformers' CrossEncoder does."""
    enc = tokenizer(
        queries, passages, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    types = enc.get("token_type_ids")
    return {
        "ids": enc["input_ids"],
        "mask": enc["attention_mask"],
        "types": types if types is not None else torch.zeros_like(enc["input_ids"]),
    }


def tokenise_bi(
    tokenizer: PreTrainedTokenizerBase, queries: list[str], passages: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Queries and passages encoded separately (each padded to its own longest row)."""
    q = tokenizer(queries, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    p = tokenizer(passages, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {
        "q_ids": q["input_ids"],
        "q_mask": q["attention_mask"],
        "p_ids": p["input_ids"],
        "p_mask": p["attention_mask"],
    }


class RerankStream:
    """Batches of `batch_size` training queries in the classifier family's resumable, sharded order; each
    query's candidates are its positive, `negatives` hard negatives drawn (by seed, epoch and query) from
    its mined list, and the positives of the next `in_batch` queries of the batch."""

    def __init__(
        self,
        pairs: Pairs,
        hard: torch.Tensor,
        tokenizer: PreTrainedTokenizerBase,
        *,
        kind: str,
        batch_size: int,
        negatives: int,
        in_batch: int,
        max_length: int,
        seed: int,
    ) -> None:
        rows = torch.arange(len(pairs.queries))
        self.rows = TensorStream(rows, rows, rows, batch_size, seed)
        self.pairs, self.hard, self.tokenizer = pairs, hard, tokenizer
        self.kind, self.negatives, self.in_batch = kind, negatives, in_batch
        self.max_length, self.seed = max_length, seed

    def shard(self, rank: int, world: int) -> None:
        self.rows.shard(rank, world)

    def _candidates(self, query: list[int], epoch: int) -> torch.Tensor:
        pos = self.pairs.positive
        out = []
        for i, q in enumerate(query):
            hard = random.Random(f"{self.seed}/{epoch}/{q}").sample(self.hard[q].tolist(), self.negatives)
            shared = [int(pos[query[(i + j) % len(query)]]) for j in range(1, self.in_batch + 1)]
            out.append([int(pos[q]), *hard, *shared])
        return torch.tensor(out, dtype=torch.long)

    def next_batch(self) -> RerankBatch:
        query = self.rows.next_batch().index
        cand = self._candidates(query.tolist(), self.rows.epoch)
        texts = [self.pairs.queries[q] for q in query.tolist()]
        if self.kind == "cross":
            b, c = cand.shape
            passages = [self.pairs.passages[p] for p in cand.flatten().tolist()]
            tokens = tokenise_pairs(
                self.tokenizer, [t for t in texts for _ in range(c)], passages, self.max_length
            )
            masks = [tokens["mask"]]
        else:
            unique, index = torch.unique(cand, return_inverse=True)
            tokens = tokenise_bi(
                self.tokenizer, texts, [self.pairs.passages[p] for p in unique.tolist()], self.max_length
            )
            tokens["p_index"] = index
            masks = [tokens["q_mask"], tokens["p_mask"]]
        padded = {
            "real_tokens": float(sum(m.sum() for m in masks)),
            "padded_slots": float(sum(m.numel() for m in masks)),
        }
        return RerankBatch(query, cand, tokens, padded=padded)

    def state_dict(self) -> dict[str, Any]:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state)
