"""What a speculative decoding run measured: how often the target accepted the draft, how many tokens
each target forward produced, and where the time went. Stats of several runs add up (`merge`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SpeculativeStats:
    """Counts and seconds of one or more speculative runs; the rates are derived from them."""

    proposed: int = 0  # draft tokens drafted (gamma per row and round)
    judged: int = 0  # draft tokens the target judged (those after the first rejection are never looked at)
    accepted: int = 0
    reached: list[int] = field(default_factory=list)  # per draft position: rows-rounds that judged it
    accepted_at: list[int] = field(default_factory=list)  # per draft position: accepted there
    rounds: int = 0  # row-rounds (one row through one verification)
    new_tokens: int = 0  # tokens produced (after EOS / max_new_tokens cuts)
    target_calls: int = 0  # all target forwards, prefill included
    verify_calls: int = 0  # target forwards that verified drafts
    draft_calls: int = 0  # all draft forwards, prefill included
    draft_step_calls: int = 0  # draft forwards while drafting (no prefill)
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0  # drafting forwards and sampling
    draft_forward_seconds: float = 0.0  # the draft's forwards alone while drafting (its per-token cost)
    verify_seconds: float = 0.0  # target forwards and the accept/reject step
    total_seconds: float = 0.0
    gammas: list[int] = field(default_factory=list)  # gamma of each verification (adaptive runs vary)

    def record_round(self, gamma: int, accepted_per_row: list[int], produced: int) -> None:
        """Count one verification over the batch's rows: row r accepted its first `accepted_per_row[r]`."""
        while len(self.reached) < gamma:
            self.reached.append(0)
            self.accepted_at.append(0)
        for n in accepted_per_row:
            for i in range(min(n + 1, gamma)):  # position i was judged when all before it were accepted
                self.reached[i] += 1
                self.accepted_at[i] += int(i < n)
            self.proposed += gamma
            self.judged += min(n + 1, gamma)
            self.accepted += n
        self.rounds += len(accepted_per_row)
        self.new_tokens += produced
        self.gammas.append(gamma)

    @property
    def alpha(self) -> float:
        """Acceptance rate: accepted draft tokens / proposed (drafted) draft tokens."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def alpha_judged(self) -> float:
        """Accepted / judged draft tokens: drafts after a rejection are discarded unseen, so this is the
        per-token acceptance probability that Leviathan et al.'s speed-up formula takes."""
        return self.accepted / self.judged if self.judged else 0.0

    @property
    def alpha_per_position(self) -> list[float | None]:
        """P(accepted at draft position i | reached position i); None where never reached."""
        return [a / r if r else None for a, r in zip(self.accepted_at, self.reached, strict=True)]

    @property
    def tokens_per_target_call(self) -> float:
        """Mean tokens a verifying target forward produced per row (accepted drafts + the one it samples)."""
        return self.new_tokens / self.rounds if self.rounds else 0.0

    def merge(self, other: SpeculativeStats) -> None:
        """Add another run's counts and seconds to these."""
        for name in ("proposed", "judged", "accepted", "rounds", "new_tokens", "target_calls", "verify_calls",
                     "draft_calls", "draft_step_calls"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in (
            "prefill_seconds",
            "draft_seconds",
            "draft_forward_seconds",
            "verify_seconds",
            "total_seconds",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.reached, other.reached), (self.accepted_at, other.accepted_at)):
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, v in enumerate(theirs):
                mine[i] += v
        self.gammas.extend(other.gammas)

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON reports."""
        return {
            "alpha": self.alpha,
            "alpha_judged": self.alpha_judged,
            "alpha_per_position": self.alpha_per_position,
            "reached_per_position": list(self.reached),
            "tokens_per_target_call": self.tokens_per_target_call,
            "proposed": self.proposed,
            "judged": self.judged,
            "accepted": self.accepted,
            "new_tokens": self.new_tokens,
            "rounds": self.rounds,
            "target_calls": self.target_calls,
            "verify_calls": self.verify_calls,
            "draft_calls": self.draft_calls,
            "draft_step_calls": self.draft_step_calls,
            "mean_gamma": sum(self.gammas) / len(self.gammas) if self.gammas else 0.0,
            "prefill_seconds": self.prefill_seconds,
            "draft_seconds": self.draft_seconds,
            "draft_forward_seconds": self.draft_forward_seconds,
            "verify_seconds": self.verify_seconds,
            "total_seconds": self.total_seconds,
        }


def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """Leviathan et al.'s expected tokens per target call for i.i.d. acceptance alpha: (1 - a^(g+1)) / (1 - a)."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def expected_speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
    """Leviathan et al.'s expected wall-clock speed-up with draft/target cost ratio c: E[tokens]/(g c + 1)."""
    return expected_tokens_per_call(alpha, gamma) / (gamma * cost_ratio + 1.0)
