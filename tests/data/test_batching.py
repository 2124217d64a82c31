import torch

from distill.data.batching import IGNORE, BatchStream, collate, plan_batches
from distill.data.tokenize import TokenizedExample
from distill.models.body import batch_hidden
from tests.conftest import tiny_llama


def examples(lengths: list[int], prompt: int = 3) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(0)
    return [
        TokenizedExample(torch.randint(3, 100, (n,), generator=g).tolist(), prompt_len=prompt)
        for n in lengths
    ]


def test_targets_are_shifted_answer_tokens() -> None:
    ex = TokenizedExample([10, 11, 12, 13, 14], prompt_len=2)
    b = collate([ex], [[0]], pad_id=0, packing=False, pad_to_multiple=1)
    assert b.targets.tolist() == [[IGNORE, 12, 13, 14, IGNORE]]
    assert b.num_loss_tokens == 3 == ex.num_loss_tokens


def test_every_example_once_per_epoch_and_deterministic() -> None:
    lengths = [5, 9, 3, 8, 2, 7, 4, 6, 1, 10]
    for packing in (False, True):
        plan = plan_batches(lengths, 3, seed=1, epoch=0, packing=packing, max_length=12)
        seen = sorted(i for batch in plan for row in batch for i in row)
        assert seen == list(range(len(lengths)))
        assert plan == plan_batches(lengths, 3, seed=1, epoch=0, packing=packing, max_length=12)
    assert plan_batches(lengths, 3, seed=1, epoch=0) != plan_batches(lengths, 3, seed=1, epoch=1)


def test_length_grouping_cuts_padding() -> None:
    lengths = [int(x) for x in torch.randint(5, 200, (256,), generator=torch.Generator().manual_seed(0))]
    exs = examples(lengths)

    def padding(group: bool) -> float:
        plan = plan_batches(lengths, 8, seed=0, epoch=0, group_by_length=group)
        slots = sum(collate(exs, rows, 0, False, 1).num_slots for rows in plan)
        return 1 - sum(lengths) / slots

    assert padding(True) < 0.1 < padding(False)


def test_packed_rows_equal_separate_sequences() -> None:
    model = tiny_llama(vocab=100, layers=2)
    exs = examples([10, 7, 5])
    sep = collate(exs, [[0], [1], [2]], 0, packing=False)
    packed = collate(exs, [[0, 1, 2]], 0, packing=True)
    with torch.no_grad():
        a = batch_hidden(model, sep)[sep.targets != IGNORE]
        b = batch_hidden(model, packed)[packed.targets != IGNORE]
    assert torch.allclose(a, b, atol=1e-5)
    assert packed.num_real_tokens == 22


def test_stream_resumes_at_the_same_batch() -> None:
    exs = examples([5, 9, 3, 8, 2, 7, 4])
    s1 = BatchStream(exs, 2, 0, seed=3, group_by_length=True, packing=False, max_length=32)
    for _ in range(5):
        s1.next_batch()
    s2 = BatchStream(exs, 2, 0, seed=3, group_by_length=True, packing=False, max_length=32)
    s2.load_state_dict(s1.state_dict())
    for _ in range(4):
        assert torch.equal(s1.next_batch().input_ids, s2.next_batch().input_ids)
