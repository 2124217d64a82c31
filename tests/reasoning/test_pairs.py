"""Pair batches (first elements in rows [0, B), second ones in [B, 2B), exact resume, reshuffled epochs,
sharding) and the reasoning views of factory data (step-by-step tasks, chunk-wise examples)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from distill.data.batching import IGNORE, Batch
from distill.data.pairs import Pair, PairStream, tokenize_pairs
from distill.data.reasoning_views import chunked_examples, split_chunks, step_by_step_pairs, with_prefix
from distill.data.records import Example
from distill.data.tokenize import TokenizedExample, completion_ids, prompt_ids
from distill.errors import InputError

TRACE = "First, 6 times 7.  That is 42!\nCheck: 42 / 7 = 6.\n\nSo it holds.\nAnswer: 42"


def _pairs(n: int) -> list[Pair]:
    """Pair i: first = [i, i, ...] (prompt 1 token), second = [100 + i, ...]; lengths vary."""
    return [
        (TokenizedExample([i] * (2 + i % 3), 1), TokenizedExample([100 + i] * (2 + (i * 5) % 4), 1))
        for i in range(n)
    ]


def _ids(batch: Batch) -> list[int]:
    """The pair index of each row (from its first token)."""
    return [int(x) % 100 for x in batch.input_ids[:, 0]]


def test_batch_rows_are_first_then_second_elements_of_the_same_pairs() -> None:
    stream = PairStream(_pairs(10), 3, pad_id=0, seed=1)
    seen: list[int] = []
    for _ in range(4):  # one epoch: 3 + 3 + 3 + 1 pairs
        batch = stream.next_batch()
        rows = batch.input_ids.shape[0]
        b = rows // 2
        assert rows % 2 == 0 and _ids(batch)[:b] == _ids(batch)[b:]
        assert all(int(x) < 100 for x in batch.input_ids[:b, 0]) and all(
            int(x) >= 100 for x in batch.input_ids[b:, 0]
        )
        for r, pair in enumerate(_ids(batch)[:b]):  # every answer token carries loss, nothing else
            first, second = _pairs(10)[pair]
            assert batch.targets[r][batch.targets[r] != IGNORE].tolist() == first.input_ids[1:]
            assert batch.targets[b + r][batch.targets[b + r] != IGNORE].tolist() == second.input_ids[1:]
        seen += _ids(batch)[:b]
    assert sorted(seen) == list(range(10)) and stream.epoch == 0


def test_exact_resume_and_reshuffled_epochs() -> None:
    stream = PairStream(_pairs(9), 2, pad_id=0, seed=3)
    for _ in range(3):
        stream.next_batch()
    state = stream.state_dict()
    want = [stream.next_batch() for _ in range(7)]  # crosses into the next epoch
    again = PairStream(_pairs(9), 2, pad_id=0, seed=3)
    again.load_state_dict(state)
    for a, b in zip(want, [again.next_batch() for _ in range(7)], strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    fresh = PairStream(_pairs(9), 2, pad_id=0, seed=3)
    e0, e1 = _epoch_order(fresh), _epoch_order(fresh)
    assert sorted(e0) == sorted(e1) == list(range(9)) and e0 != e1
    assert _epoch_order(PairStream(_pairs(9), 2, pad_id=0, seed=4)) != e0


def _epoch_order(stream: PairStream) -> list[int]:
    order: list[int] = []
    while len(order) < 9:
        batch = stream.next_batch()
        order += _ids(batch)[: batch.input_ids.shape[0] // 2]
    return order


def test_shards_split_the_global_batch() -> None:
    whole = PairStream(_pairs(8), 4, pad_id=0, seed=0)
    ranks = [PairStream(_pairs(8), 2, pad_id=0, seed=0) for _ in range(2)]
    for r, s in enumerate(ranks):
        s.shard(r, 2)
    for _ in range(3):
        w = _ids(whole.next_batch())
        parts = [_ids(s.next_batch()) for s in ranks]
        assert parts[0][:2] + parts[1][:2] == w[:4] and all(p[:2] == p[2:] for p in parts)


def test_no_pairs_is_refused() -> None:
    with pytest.raises(Exception, match="no training pairs"):
        PairStream([], 2, pad_id=0, seed=0)


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE (fast: character offsets) with an end token and no chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TRACE, "What is 6 times 7?", "the answer is 42. Then check it.\n"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def _example(completion: str | None = TRACE, finished: bool = True) -> Example:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6 times 7?"}]
    return Example(msgs, completion, meta={"answer": "42"}, finished=finished)


def test_tokenize_pairs_drops_a_pair_when_either_side_is_dropped() -> None:
    tok = tiny_tokenizer()
    pairs = [
        (_example(), _example("Answer: 41")),
        (_example(), _example(None)),
        (_example("x"), _example("y")),
    ]
    out, dropped = tokenize_pairs(tok, pairs, 256, None)
    assert dropped == 1 and len(out) == 2
    assert out[1][0].input_ids[out[1][0].prompt_len :] == completion_ids(tok, "x")


def test_with_prefix_goes_on_the_last_user_message() -> None:
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert [m["content"] for m in with_prefix(msgs, "[p] ")] == ["a", "b", "[p] c"]
    assert msgs[2]["content"] == "c" and with_prefix(msgs, "") == msgs
    with pytest.raises(InputError, match="user message"):
        with_prefix([{"role": "system", "content": "s"}], "[p] ")


def _stand_in_split(response: str) -> tuple[str, str | None]:
    head, sep, tail = response.rpartition("Answer:")
    return (head.strip(), tail.strip()) if sep else (response.strip(), None)


def test_step_by_step_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("distill.reasoning.verifiers")
    fake.split_rationale = _stand_in_split  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "distill.reasoning.verifiers", fake)
    examples = [
        _example(),
        _example("no marker here"),
        _example(None),
        _example("Answer: 42"),
        _example(finished=False),
    ]
    pairs = step_by_step_pairs(examples, "[answer] ", "[rationale] ")
    assert len(pairs) == 2  # no answer, no completion and no rationale are left out
    label, rationale = pairs[0]
    assert label.prompt[0] == examples[0].prompt[0]
    assert label.prompt[1]["content"] == "[answer] What is 6 times 7?" and label.completion == "Answer: 42"
    assert rationale.prompt[1]["content"] == "[rationale] What is 6 times 7?"
    assert rationale.completion == _stand_in_split(TRACE)[0] and rationale.meta == {"answer": "42"}
    assert pairs[1][0].finished and pairs[1][1].finished  # each task's text is whole


def test_step_by_step_pairs_with_the_real_verifier() -> None:
    pytest.importorskip("distill.reasoning.verifiers")
    ((label, rationale),) = step_by_step_pairs([_example()], "[a] ", "[r] ")
    assert label.completion == "Answer: 42"
    assert rationale.completion is not None and "So it holds." in rationale.completion
    assert "Answer" not in rationale.completion


@pytest.mark.parametrize("by", ["line", "sentence"])
@pytest.mark.parametrize("max_chunks", [1, 2, 3, 50])
def test_split_chunks(by: str, max_chunks: int) -> None:
    chunks = split_chunks(TRACE, by, max_chunks)
    assert "".join(chunks) == TRACE and all(c.strip() for c in chunks) and len(chunks) <= max_chunks
    if max_chunks == 50:
        want_lines = [
            "First, 6 times 7.  That is 42!\n",
            "Check: 42 / 7 = 6.\n\n",
            "So it holds.\n",
            "Answer: 42",
        ]
        if by == "line":
            assert chunks == want_lines
        else:
            assert chunks[:3] == ["First, 6 times 7.", "  That is 42!\n", "Check: 42 / 7 = 6.\n\n"]
            assert len(chunks) == 5


def _check_chunked(tok: PreTrainedTokenizerBase, by: str, max_chunks: int) -> list[TokenizedExample]:
    ex = _example()
    out = chunked_examples(tok, [ex, _example(None)], 512, "Sys.", chunk_by=by, max_chunks=max_chunks)
    prompt = prompt_ids(tok, ex.prompt, "Sys.")
    whole = completion_ids(tok, TRACE)  # one tokenisation of the whole answer, end token included
    assert len(out) == len(split_chunks(TRACE, by, max_chunks))
    assert out[0].prompt_len == len(prompt)
    for k, item in enumerate(out):
        assert (
            item.input_ids == prompt + whole[: len(item.input_ids) - len(prompt)]
        )  # context = earlier chunks
        if k:
            assert item.prompt_len == len(out[k - 1].input_ids)  # loss covers chunk k only
        assert item.num_loss_tokens > 0
    assert out[-1].input_ids == prompt + whole and out[-1].input_ids[-1] == tok.eos_token_id
    return out


@pytest.mark.parametrize("by", ["line", "sentence"])
def test_chunked_examples_cover_the_answer_once(by: str) -> None:
    tok = tiny_tokenizer()
    out = _check_chunked(tok, by, 8)
    texts = [tok.decode(o.input_ids[o.prompt_len :]) for o in out[:-1]]
    assert texts == split_chunks(TRACE, by, 8)[:-1]  # the chunks' own text, cut at their bounds
    assert len(_check_chunked(tok, by, 2)) == 2


def test_chunked_examples_respect_max_length_and_unfinished_answers() -> None:
    tok = tiny_tokenizer()
    ex = _example(finished=False)
    full = chunked_examples(tok, [ex], 512, None)
    prompt_len = full[0].prompt_len
    assert full[-1].input_ids[-1] != tok.eos_token_id
    cap = full[1].prompt_len + 2  # chunk 1 is cut, chunk 2 on starts past the limit
    cut = chunked_examples(tok, [ex], cap, None)
    assert len(cut) == 2 and len(cut[1].input_ids) == cap and cut[0] == full[0]
    assert chunked_examples(tok, [ex], prompt_len, None) == []


def test_chunked_examples_with_the_smollm2_chat_template(smol_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    out = _check_chunked(tok, "line", 8)
    assert len(out) == 4
