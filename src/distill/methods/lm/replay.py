"""DistiLLM's adaptive off-policy approach (Ko et al. 2024) for `on_policy`: student-generated outputs
(SGOs) are stored and reused, and the probability of training on them adapts to the loss.

Per batch, with a uniform draw r and the current SGO probability p:
- r < p * (1 - t / T), or r < p while the buffer is not yet full: sample fresh SGOs, store them;
- else r < p: draw a batch of stored SGOs;
- else: the dataset's batch.
p starts low and is raised each time the loss stalls (see `configs.on_policy.ReplayConfig`). Everything
here is plain numbers, lists and tensors, so `state_dict` checkpoints it and a resumed run takes exactly
the decisions and samples an uninterrupted one takes.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Literal

import torch

from distill.configs.on_policy import ReplayConfig
from distill.data.tokenize import TokenizedExample
from distill.errors import CompatibilityError

Choice = Literal["fresh", "replay", "dataset"]


class ReplayBuffer:
    """Whole rows (prompt + the student's completion), first in first out, at most `capacity` of them."""

    def __init__(self, capacity: int) -> None:
        self.rows: deque[TokenizedExample] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def full(self) -> bool:
        return len(self.rows) == self.rows.maxlen

    def add(self, rows: list[TokenizedExample]) -> None:
        self.rows.extend(rows)

    def sample(self, n: int, generator: torch.Generator) -> list[TokenizedExample]:
        """`n` distinct rows, uniformly (DistiLLM's `random.sample`)."""
        order = torch.randperm(len(self.rows), generator=generator)[:n].tolist()
        return [self.rows[i] for i in order]

    def state_dict(self) -> dict[str, torch.Tensor]:
        rows = list(self.rows)
        ids = [t for r in rows for t in r.input_ids]
        return {
            "ids": torch.tensor(ids, dtype=torch.long),
            "lengths": torch.tensor([len(r.input_ids) for r in rows], dtype=torch.long),
            "prompt_lens": torch.tensor([r.prompt_len for r in rows], dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rows.clear()
        pieces = torch.split(state["ids"], state["lengths"].tolist()) if len(state["lengths"]) else ()
        for ids, prompt_len in zip(pieces, state["prompt_lens"].tolist(), strict=True):
            self.rows.append(TokenizedExample(input_ids=ids.tolist(), prompt_len=int(prompt_len)))


class AdaptiveReplay:
    """The SGO probability, its loss windows and the buffer; counts what each batch was."""

    def __init__(self, cfg: ReplayConfig) -> None:
        self.cfg = cfg
        self.buffer = ReplayBuffer(cfg.buffer_size)
        self.prob = cfg.start_prob
        self.total_steps: int | None = None  # the run's length (train.steps), told by the family
        self.steps = 0
        self.window = [0.0, 0.0]  # summed per-token loss and tokens of the dataset's batches
        self.previous: float | None = None  # mean loss of the last window that had dataset batches
        self.counts = {"fresh": 0, "replay": 0, "dataset": 0}

    def choose(self, r: float) -> Choice:
        share = self.fresh_share()
        if r >= self.prob:
            choice: Choice = "dataset"
        elif r < self.prob * share or not self.buffer.full:
            choice = "fresh"
        else:
            choice = "replay"
        self.counts[choice] += 1
        return choice

    def fresh_share(self) -> float:
        if self.total_steps is None:
            raise CompatibilityError(
                "replay: the fresh-sample share decays over the run, whose length the method was not told "
                "(the family must call set_total_steps(train.steps))"
            )
        return max(0.0, 1.0 - self.steps / max(self.total_steps, 1))

    def record(self, loss_sum: float, tokens: float) -> None:
        """A dataset batch's summed per-token loss: the signal that moves the probability."""
        self.window[0] += loss_sum
        self.window[1] += tokens

    def end_step(self) -> None:
        """After each optimizer step: close a window every `check_every` steps, raising the probability
        when its mean loss is not `min_improvement` below the previous window's."""
        self.steps += 1
        if self.steps % self.cfg.check_every or self.window[1] == 0:
            return
        mean = self.window[0] / self.window[1]
        if self.previous is not None and mean > self.previous * (1 - self.cfg.min_improvement):
            self.prob = min(self.prob + self.cfg.increment, self.cfg.max_prob)
        self.previous = mean
        self.window = [0.0, 0.0]

    def parts(self, weight: float) -> dict[str, float]:
        """Loss parts, scaled by the batch's share of the update's loss units, so the engine's sum over
        micro-batches (and processes) logs the values themselves."""
        batches = max(sum(self.counts.values()), 1)
        return {
            "sgo_prob": self.prob * weight,
            "fresh_fraction": self.counts["fresh"] / batches * weight,
            "replay_fraction": self.counts["replay"] / batches * weight,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer": self.buffer.state_dict(),
            "prob": self.prob,
            "steps": self.steps,
            "window": list(self.window),
            "previous": [] if self.previous is None else [self.previous],
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.prob = float(state["prob"])
        self.steps = int(state["steps"])
        self.window = [float(v) for v in state["window"]]
        self.previous = float(state["previous"][0]) if state["previous"] else None
        self.counts = {k: int(v) for k, v in state["counts"].items()}
