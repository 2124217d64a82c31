"""Batches with as little padding as possible: length-grouped dynamic padding, or packing with
per-sequence position ids (the model then attends only within each packed sequence).

The order of batches is a pure function of (seed, epoch), so a resumed run only needs (epoch, index).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from distill.data.tokenize import TokenizedExample
from distill.errors import CompatibilityError

IGNORE = -100


@dataclass(frozen=True)
class SequenceSpan:
    """One sequence of a batch: row `row`, columns [start, end); `selected` indexes within the span."""

    row: int
    start: int
    end: int
    selected: list[int]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor | None  # (B, L); None when packed (position_ids mark the boundaries)
    position_ids: torch.Tensor  # (B, L)
    targets: torch.Tensor  # (B, L): next token where it carries loss, else -100 (already shifted)
    num_real_tokens: int  # non-padding tokens

    @property
    def num_loss_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    @property
    def num_slots(self) -> int:
        return int(self.input_ids.numel())

    def stats(self) -> dict[str, float]:
        """What the engine logs per step (summed over micro-batches)."""
        return {"real_tokens": self.num_real_tokens, "padded_slots": self.num_slots}

    def sequences(self, select: torch.Tensor) -> list[SequenceSpan]:
        """Each sequence holding selected positions, row-major: where it lies and which of its positions
        are selected. A row holds one sequence (padded batches: the real tokens are where attention_mask
        is 1, at the start of the row) or several (packed: position ids restart at each sequence). The
        cache and the served teacher both split batches through here."""
        if select.shape != self.input_ids.shape:
            raise CompatibilityError(
                f"select {tuple(select.shape)} does not match the batch {tuple(self.input_ids.shape)}"
            )
        sel = select.detach().cpu().bool()
        pos = self.position_ids.detach().cpu()
        mask = None if self.attention_mask is None else self.attention_mask.detach().cpu().bool()
        out: list[SequenceSpan] = []
        bsz, width = sel.shape
        for b in range(bsz):
            if not bool(sel[b].any()):
                continue
            breaks = torch.ones(width, dtype=torch.bool)
            breaks[1:] = pos[b, 1:] != pos[b, :-1] + 1
            if mask is not None:
                breaks[1:] |= mask[b, 1:] != mask[b, :-1]
            bounds = [*torch.nonzero(breaks).flatten().tolist(), width]
            for s, e in zip(bounds[:-1], bounds[1:], strict=True):
                chosen = torch.nonzero(sel[b, s:e]).flatten().tolist()
                if not chosen:
                    continue
                if mask is not None and not bool(mask[b, s:e].all()):
                    raise CompatibilityError(f"selected positions on padding (attention_mask 0) in row {b}")
                if int(pos[b, s]) != 0:
                    raise CompatibilityError(f"row {b}: a selected sequence does not start at position 0")
                out.append(SequenceSpan(row=b, start=s, end=e, selected=chosen))
        return out

    def to(self, device: torch.device) -> Batch:
        if self.input_ids.device == device:
            return self
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=None if self.attention_mask is None else self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
            targets=self.targets.to(device),
            num_real_tokens=self.num_real_tokens,
        )


def plan_batches(
    lengths: list[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
    packing: bool = False,
    max_length: int = 512,
) -> list[list[list[int]]]:
    """Return batches; each batch is a list of rows; each row is a list of example indices (one unless packed)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if packing:
        rows = _pack_first_fit(order, lengths, max_length)
        batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        rng.shuffle(batches)
        return batches
    if group_by_length:
        mega = batch_size * 32
        grouped: list[int] = []
        for start in range(0, len(order), mega):
            grouped.extend(sorted(order[start : start + mega], key=lambda i: -lengths[i]))
        order = grouped
    batches = [[[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def _pack_first_fit(order: list[int], lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit decreasing over a shuffled order: rows are filled close to max_length."""
    rows: list[list[int]] = []
    space: list[int] = []
    for i in sorted(order, key=lambda i: -lengths[i]):
        n = min(lengths[i], max_length)
        for r, free in enumerate(space):
            if n <= free:
                rows[r].append(i)
                space[r] -= n
                break
        else:
            rows.append([i])
            space.append(max_length - n)
    return rows


def _targets(ex: TokenizedExample) -> list[int]:
    ids = ex.input_ids
    return [ids[i + 1] if i + 1 >= ex.prompt_len else IGNORE for i in range(len(ids) - 1)] + [IGNORE]


def collate(
    examples: list[TokenizedExample],
    rows: list[list[int]],
    pad_id: int,
    packing: bool,
    pad_to_multiple: int = 8,
) -> Batch:
    """Build tensors for one batch. Padding goes to the longest row (rounded up to `pad_to_multiple`)."""
    seqs: list[list[int]] = []
    tgts: list[list[int]] = []
    poss: list[list[int]] = []
    for row in rows:
        ids: list[int] = []
        tg: list[int] = []
        pos: list[int] = []
        for i in row:
            ex = examples[i]
            ids.extend(ex.input_ids)
            tg.extend(_targets(ex))
            pos.extend(range(len(ex.input_ids)))
        seqs.append(ids)
        tgts.append(tg)
        poss.append(pos)
    width = max(len(s) for s in seqs)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    bsz = len(seqs)
    input_ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    targets = torch.full((bsz, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((bsz, width), dtype=torch.long)
    attention = torch.zeros((bsz, width), dtype=torch.long)
    for b, (s, t, p) in enumerate(zip(seqs, tgts, poss, strict=True)):
        n = len(s)
        input_ids[b, :n] = torch.tensor(s)
        targets[b, :n] = torch.tensor(t)
        position_ids[b, :n] = torch.tensor(p)
        # padding continues as its own "sequence" so packed masks never join it to real text
        position_ids[b, n:] = torch.arange(width - n)
        attention[b, :n] = 1
    real = sum(len(s) for s in seqs)
    return Batch(
        input_ids=input_ids,
        attention_mask=None if packing else attention,
        position_ids=position_ids,
        targets=targets,
        num_real_tokens=real,
    )


def shard_rows(rows: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """Rank `rank`'s contiguous share of one global batch (sizes differ by at most one row)."""
    base, extra = divmod(len(rows), world)
    start = rank * base + min(rank, extra)
    return rows[start : start + base + (1 if rank < extra else 0)]


class BatchStream:
    """Endless, resumable stream of batches over epochs: its state is just (epoch, index).

    Sharded by process: the plan is made for the global batch (`batch_size` rows per process times the
    number of processes) and each process collates its contiguous share, so every example is seen once
    per epoch across processes and N processes see exactly the batches one process would with N times
    the batch size. A last global batch too small to give every process a row joins the one before."""

    def __init__(
        self,
        examples: list[TokenizedExample],
        batch_size: int,
        pad_id: int,
        *,
        seed: int,
        group_by_length: bool,
        packing: bool,
        max_length: int,
    ) -> None:
        if not examples:
            raise CompatibilityError("data.train: no training examples")
        self.examples = examples
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.group_by_length = group_by_length
        self.packing = packing
        self.max_length = max_length
        self.rank, self.world = 0, 1
        self.epoch = 0
        self.index = 0
        self._plan: list[list[list[int]]] | None = None

    def shard(self, rank: int, world: int) -> None:
        if not 0 <= rank < world:
            raise CompatibilityError(f"process rank {rank} outside a world of {world}")
        self.rank, self.world = rank, world
        self._plan = None

    def _current_plan(self) -> list[list[list[int]]]:
        if self._plan is None:
            plan = plan_batches(
                [len(e.input_ids) for e in self.examples],
                self.batch_size * self.world,
                seed=self.seed,
                epoch=self.epoch,
                group_by_length=self.group_by_length,
                packing=self.packing,
                max_length=self.max_length,
            )
            if len(plan) > 1 and len(plan[-1]) < self.world:
                plan[-2] = plan[-2] + plan.pop()
            if len(plan[0]) < self.world:
                raise CompatibilityError(
                    f"data.train: {len(plan[0])} rows cannot feed {self.world} processes; use more examples"
                )
            self._plan = plan
        return self._plan

    def next_batch(self) -> Batch:
        plan = self._current_plan()
        if self.index >= len(plan):
            self.epoch += 1
            self.index = 0
            self._plan = None
            plan = self._current_plan()
        rows = shard_rows(plan[self.index], self.rank, self.world)
        self.index += 1
        return self.collate_rows(rows)

    def collate_rows(self, rows: list[list[int]]) -> Batch:
        """One batch of these rows (subclasses add what their methods need)."""
        return collate(self.examples, rows, self.pad_id, self.packing)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._plan = None
