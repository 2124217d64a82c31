"""Relevance scorers of (query, passage) pairs: a bi-encoder (cosine of two embeddings) and a
cross-encoder (one encoder pass over the pair, a linear head on BERT's pooled output), their scores on
token batches for training, on text for evaluation, and the cross-encoder's export.

The cross-encoder export is a transformers `BertForSequenceClassification` folder with one label, which
is what sentence-transformers' `CrossEncoder(path)` loads; its config names the identity as the
activation, so `CrossEncoder.predict` returns the raw scores this module computes (Margin-MSE fixes only
score differences, so a sigmoid on top would be arbitrary).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from distill.embed.encoders import SentenceEncoder
from distill.embed.rerank_data import tokenise_pairs

IDENTITY = "torch.nn.modules.linear.Identity"
# (queries, passages, batch size) -> (n,) scores of the pairs (queries[i], passages[i])
PairScorer = Callable[[list[str], list[str], int], torch.Tensor]


class CrossBody(nn.Module):
    """The student encoder read over "[CLS] query [SEP] passage [SEP]": BERT's pooled output (the
    [CLS] state through the pooler's dense + tanh), which a linear head turns into a score."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        if getattr(model, "pooler", None) is None:
            raise ValueError(
                f"student_kind: cross needs a BERT-like encoder with a pooler; {type(model).__name__} has none"
            )
        self.model = model

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output


def score_head(width: int, seed: int, std: float = 0.02) -> nn.Linear:
    """A linear score head, N(0, std) weights (BERT's initializer range) and zero bias, fixed by `seed`."""
    head = nn.Linear(width, 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, width, generator=torch.Generator().manual_seed(seed)) * std)
        head.bias.zero_()
    return head


class BiBody(nn.Module):
    """The student encoder embedding a batch's queries and its distinct passages in one forward call
    (one call of a distributed wrapper per step)."""

    def __init__(self, encoder: SentenceEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, q_ids: torch.Tensor, q_mask: torch.Tensor, p_ids: torch.Tensor, p_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(q_ids, q_mask), self.encoder(p_ids, p_mask)


def bi_scores(body: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, C)`` cosines of each query's embedding with its candidates' (`p_index` picks the rows)."""
    q, p = body(tokens["q_ids"], tokens["q_mask"], tokens["p_ids"], tokens["p_mask"])
    q, p = nn.functional.normalize(q, dim=-1), nn.functional.normalize(p, dim=-1)
    return (q.unsqueeze(1) * p[tokens["p_index"]]).sum(-1)


def cross_scores(
    body: nn.Module, head: nn.Module, tokens: dict[str, torch.Tensor], shape: tuple[int, int]
) -> torch.Tensor:
    """``(B, C)`` head scores of the ``B * C`` pair rows (row-major: query by query)."""
    return head(body(tokens["ids"], tokens["mask"], tokens["types"])).view(shape)


def _by_length(texts: list[str]) -> list[int]:
    """Row order by text length (less padding per batch); scores are put back in the input order."""
    return sorted(range(len(texts)), key=lambda i: len(texts[i]))


@torch.no_grad()
def embed_texts(
    encoder: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch: int, max_length: int
) -> torch.Tensor:
    """Unit-norm embeddings ``(N, D)`` of `texts` (float32), encoded in batches of similar length."""
    order = _by_length(texts)
    out = torch.empty(len(texts), 0)
    for i in range(0, len(texts), batch):
        rows = order[i : i + batch]
        enc = tokenizer(
            [texts[r] for r in rows],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        emb = nn.functional.normalize(encoder(enc["input_ids"], enc["attention_mask"]).float(), dim=-1)
        if out.shape[1] == 0:
            out = torch.empty(len(texts), emb.shape[1])
        out[rows] = emb
    return out


def bi_scorer(encoder: SentenceEncoder, tokenizer: PreTrainedTokenizerBase, max_length: int) -> PairScorer:
    """Scores pairs by cosine: every distinct query and passage of the call is encoded once."""

    def score(queries: list[str], passages: list[str], batch: int) -> torch.Tensor:
        uq, up = list(dict.fromkeys(queries)), list(dict.fromkeys(passages))
        eq = embed_texts(encoder, tokenizer, uq, batch, max_length)
        ep = embed_texts(encoder, tokenizer, up, batch, max_length)
        qi, pi = {t: i for i, t in enumerate(uq)}, {t: i for i, t in enumerate(up)}
        rows_q = eq[torch.tensor([qi[q] for q in queries])]
        rows_p = ep[torch.tensor([pi[p] for p in passages])]
        return (rows_q * rows_p).sum(-1)

    return score


def cross_scorer(
    body: nn.Module, head: nn.Module, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> PairScorer:
    """Scores pairs with one encoder pass each, in batches of similar length."""

    @torch.no_grad()
    def score(queries: list[str], passages: list[str], batch: int) -> torch.Tensor:
        order = _by_length([q + p for q, p in zip(queries, passages, strict=True)])
        out = torch.empty(len(queries))
        for i in range(0, len(order), batch):
            rows = order[i : i + batch]
            tokens = tokenise_pairs(
                tokenizer, [queries[r] for r in rows], [passages[r] for r in rows], max_length
            )
            out[rows] = cross_scores(body, head, tokens, (len(rows), 1)).float().flatten()
        return out

    return score


def export_cross_encoder(
    body: CrossBody, head: nn.Linear, tokenizer: PreTrainedTokenizerBase, folder: Path, max_length: int
) -> None:
    """A `BertForSequenceClassification` folder (one label, identity activation for sentence-transformers,
    the tokenizer truncating at `max_length`), loadable by `CrossEncoder(path)` and
    `AutoModelForSequenceClassification`."""
    config = copy.deepcopy(body.model.config)
    config.num_labels = 1
    config.architectures = None
    config.sentence_transformers = {"activation_fn": IDENTITY}
    model = AutoModelForSequenceClassification.from_config(config)
    base = getattr(model, model.base_model_prefix)
    base.load_state_dict(body.model.state_dict())
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        raise ValueError(f"{type(model).__name__}: no linear `classifier` to hold the score head")
    classifier.load_state_dict(head.state_dict())
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    saved = copy.deepcopy(tokenizer)
    saved.model_max_length = max_length
    saved.save_pretrained(folder)
