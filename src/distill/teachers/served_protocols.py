"""The two ways a served teacher gives top-k log-probs of given text: the request to send, and the parser
that turns the answer into k (token id, log-prob) pairs per selected position.

Every answer is validated (number of positions, k finite log-probs per position, token ids inside the
vocabulary); a problem raises `Malformed`, which the client retries and then reports.

Alignment. Position j of a sequence predicts token j+1. The two protocols number their answers
differently, and each has a constant here that `tests/teachers/test_served.py` proves against a live
model of the same weights (`ServedTeacherSource.check_alignment` repeats that check for users):

* ``prompt_logprobs`` (vLLM, SGLang-compatible): the prompt is sent as token ids;
  ``prompt_logprobs[i]`` is the distribution OF token i given tokens < i (entry 0 is null), so the
  prediction made AT position j is entry ``j + PROMPT_LOGPROBS_OFFSET`` (= j + 1). The prediction after
  the last prompt token comes from the first generated token's ``top_logprobs``. vLLM also adds the
  actual prompt token to each entry when it is outside the top k; only the k highest are kept.
* ``echo`` (llama.cpp's ``llama_cpp.server``): the prompt is sent as text with ``echo=true``; see
  `EchoProtocol` for where its entries land (it differs from the OpenAI convention).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from distill.teachers.served_client import Malformed

# prompt_logprobs[i] is the distribution of token i: the prediction made at position j is entry j + 1
PROMPT_LOGPROBS_OFFSET = 1
# llama.cpp's echo: after re-inserting the entries it skips for BOS tokens, entry j is the prediction AT j
ECHO_OFFSET = 0
# extra log-probs asked of llama.cpp so that k remain after dropping those keyed by ambiguous text
ECHO_EXTRA = 8

Rows = list[tuple[list[int], list[float]]]  # per selected position: top-k ids, their log-probs (descending)
Parse = Callable[[Any], tuple[Rows, int]]  # an answer -> rows, and entries that could not be placed on an id


def first_choice(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise Malformed("answer is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Malformed("no choices in the answer")
    return choices[0]


def _logprob(value: Any, where: str) -> float:
    """A log-prob from JSON: a number <= 0 (up to rounding), -inf allowed; anything else is malformed."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Malformed(f"{where}: log-prob {value!r} is not a number")
    out = float(value)
    if math.isnan(out) or out > 1e-4:
        raise Malformed(f"{where}: log-prob {out} is not a log-probability")
    return out  # -inf (an impossible token) is fine unless it ends up in the top k: `_top_k` checks


def _top_k(entries: dict[int, float], k: int, vocab_size: int, where: str) -> tuple[list[int], list[float]]:
    """Keep the k highest of {token id: log-prob}, sorted descending (ties by id, so it is deterministic)."""
    need = min(k, vocab_size)
    if len(entries) < need:
        raise Malformed(f"{where}: {len(entries)} log-probs, expected at least {need}")
    for tid in entries:
        if not 0 <= tid < vocab_size:
            raise Malformed(f"{where}: token id {tid} outside the vocabulary ({vocab_size})")
    best = sorted(entries.items(), key=lambda kv: (-kv[1], kv[0]))[:need]
    if math.isinf(best[-1][1]):
        raise Malformed(f"{where}: a top-{need} log-prob is -inf")
    mass = math.fsum(math.exp(lp) for _, lp in best)
    if mass > 1.0 + 1e-3:
        raise Malformed(f"{where}: top-{need} log-probs sum to probability {mass:.4f} > 1")
    return [t for t, _ in best], [lp for _, lp in best]


def _parse_id_keyed(entry: Any, where: str, prefix: str = "") -> dict[int, float]:
    """vLLM's prompt_logprobs entry {"123": {"logprob": -0.1, ...}} or top_logprobs {"token_id:123": -0.1}."""
    if not isinstance(entry, dict):
        raise Malformed(f"{where}: expected an object of log-probs, got {type(entry).__name__}")
    out: dict[int, float] = {}
    for key, value in entry.items():
        text = str(key)
        if prefix and text.startswith(prefix):
            text = text[len(prefix) :]
        try:
            tid = int(text)
        except ValueError:
            raise Malformed(f"{where}: key {key!r} is not a token id") from None
        lp = value.get("logprob") if isinstance(value, dict) else value
        out[tid] = _logprob(lp, where)
    return out


class PromptLogprobsProtocol:
    """vLLM / SGLang: token-id prompts, ``prompt_logprobs`` keyed by token id (an exact top-k)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def request(
        self, model: str, tokens: list[int], selected: list[int], k: int
    ) -> tuple[dict[str, Any], Parse]:
        n = len(tokens)
        last = max(selected)
        needs_next = last == n - 1  # the prediction after the last token: from the generated token
        prompt = tokens[: min(n, last + 1 + PROMPT_LOGPROBS_OFFSET)]
        payload: dict[str, Any] = {
            "model": model,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": k,
        }
        if needs_next:
            payload["logprobs"] = k
            payload["return_tokens_as_token_ids"] = True

        def parse(data: Any) -> tuple[Rows, int]:
            choice = first_choice(data)
            entries = choice.get("prompt_logprobs")
            if not isinstance(entries, list):
                raise Malformed("no prompt_logprobs in the answer (does the server support them?)")
            if len(entries) != len(prompt):
                raise Malformed(f"{len(entries)} prompt positions for a prompt of {len(prompt)} tokens")
            rows = []
            for j in selected:
                where = f"position {j}"
                if j + PROMPT_LOGPROBS_OFFSET < len(prompt):
                    entry = _parse_id_keyed(entries[j + PROMPT_LOGPROBS_OFFSET], where)
                else:
                    logprobs = choice.get("logprobs")
                    tops = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
                    if not isinstance(tops, list) or not tops:
                        raise Malformed(f"{where}: no top_logprobs for the token after the prompt")
                    entry = _parse_id_keyed(tops[0], where, prefix="token_id:")
                rows.append(_top_k(entry, k, self.vocab_size, where))
            return rows, 0

        return payload, parse


class EchoProtocol:
    """llama.cpp's server (`llama_cpp.server`): /v1/completions with echo=true and logprobs=k.

    What it returns, measured against a live model of the same weights (the test proves it):

    * It takes text, not ids: the ids are decoded and sent, and the token strings it echoes back are
      checked against ours, so a different tokenisation is an error, not a shift.
    * Its entries are indexed by prediction position, not by predicted token: after putting back the
      entries it leaves out (a leading BOS token is dropped from the echo, and every later BOS token's
      entry is skipped), entry j holds the distribution made AT position j (``ECHO_OFFSET`` = 0). Lost:
      the first entry (always null, so no prediction at position 0) and one per inner BOS token (the
      prediction just before it when the sequence starts with BOS, else the one at it).
    * Its top log-probs are keyed by token TEXT. Special tokens render as "" and partial UTF-8 bytes lose
      their bytes, so several ids can share a key; those entries cannot be placed on an id and are left
      in the tail mass (`ServedTeacherSource.echo_unresolved` counts them). k + ECHO_EXTRA log-probs are
      asked for so that k resolvable ones normally remain; fewer is an error. For an exact top-k, serve
      the teacher with vLLM or SGLang (protocol "prompt_logprobs").
    """

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.bos: int | None = getattr(tokenizer, "bos_token_id", None)
        special: set[int] = set(getattr(tokenizer, "all_special_ids", []) or [])
        for tid, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
            if getattr(added, "special", False):
                special.add(int(tid))
        pieces: list[str] = []
        by_text: dict[str, int | None] = {}
        for tid in range(vocab_size):
            text = "" if tid in special else str(tokenizer.decode([tid])).replace("\ufffd", "")
            pieces.append(text)
            by_text[text] = tid if text not in by_text else None  # None: ambiguous
        self.pieces = pieces
        self.by_text = by_text

    def request(
        self, model: str, tokens: list[int], selected: list[int], k: int
    ) -> tuple[dict[str, Any], Parse]:
        # the prediction at j needs tokens <= j; one more keeps it off the end of the echo
        prompt = tokens[: max(selected) + 2]
        text = self.tokenizer.decode(prompt, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        payload = {
            "model": model,
            "prompt": text,
            "echo": True,
            "logprobs": k + ECHO_EXTRA,
            "max_tokens": 1,
            "temperature": 0.0,
        }
        return payload, lambda data: self.rows(data, prompt, selected, k)

    def rows(self, data: Any, tokens: list[int], selected: list[int], k: int) -> tuple[Rows, int]:
        """Rows for the selected positions, and how many entries could not be placed on an id."""
        logprobs = first_choice(data).get("logprobs")
        if not isinstance(logprobs, dict):
            raise Malformed("no logprobs in the answer (was the server started with --logits_all true?)")
        echoed, tops = logprobs.get("tokens"), logprobs.get("top_logprobs")
        if not isinstance(echoed, list) or not isinstance(tops, list) or len(echoed) != len(tops):
            raise Malformed("logprobs.tokens and logprobs.top_logprobs missing or of different lengths")
        lead = 1 if self.bos is not None and tokens and tokens[0] == self.bos else 0
        by_position: dict[int, Any] = {}
        e = 0
        for idx, tid in enumerate(tokens[lead:]):
            if tid == self.bos:
                continue  # llama.cpp skips the entry of every BOS token after the first
            if e >= len(echoed):
                raise Malformed(f"echo ends after {len(echoed)} tokens; the prompt has {len(tokens)}")
            piece = self.pieces[tid] if 0 <= tid < self.vocab_size else None
            if piece and echoed[e] != piece:
                raise Malformed(
                    f"llama.cpp tokenised the text differently at position {idx + lead}: "
                    f"{echoed[e]!r} where the batch has {piece!r}"
                )
            by_position[idx] = tops[e]
            e += 1
        if e < len(echoed):  # the generated token's entry: the prediction after the last prompt token
            by_position[len(tokens) - lead] = tops[e]
        out = []
        unresolved = 0
        for j in selected:
            where = f"position {j}"
            entry = by_position.get(j + ECHO_OFFSET)
            if not isinstance(entry, dict):
                raise Malformed(
                    f"{where}: llama.cpp gives no log-probs there (none at position 0 nor next to a BOS token)"
                )
            ids: dict[int, float] = {}
            for key, value in entry.items():
                found = self.by_text.get(str(key))
                if found is None:
                    unresolved += 1
                    continue
                ids[found] = _logprob(value, where)
            out.append(_top_k(ids, k, self.vocab_size, where))
        return out, unresolved


__all__ = [
    "ECHO_OFFSET",
    "PROMPT_LOGPROBS_OFFSET",
    "EchoProtocol",
    "PromptLogprobsProtocol",
    "Rows",
    "first_choice",
]
