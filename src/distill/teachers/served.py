"""A teacher behind an OpenAI-compatible HTTP server (vLLM, SGLang, llama.cpp's server).

Two services: top-k log-probabilities of given text (the sparse teacher signal for logit distillation),
and generation (sequence-KD data). Only the standard library is used: requests run in a thread pool of
`max_concurrency` workers, each with a timeout and retries with exponential backoff; anything still
failing after the retries raises `ServedTeacherError`, one line naming the URL and the last problem.
Every response is validated (number of positions, k finite log-probs per position, token ids inside the
vocabulary): a served teacher never hands a loss zeros or silently misaligned rows.

Alignment. Position j of a sequence predicts token j+1. The two protocols number their answers
differently, and each has a constant here that `tests/teachers/test_served.py` proves against a live
model of the same weights (`check_alignment` repeats that check for users):

* ``prompt_logprobs`` (vLLM, SGLang-compatible): the prompt is sent as token ids;
  ``prompt_logprobs[i]`` is the distribution OF token i given tokens < i (entry 0 is null), so the
  prediction made AT position j is entry ``j + PROMPT_LOGPROBS_OFFSET`` (= j + 1). The prediction after
  the last prompt token comes from the first generated token's ``top_logprobs``. vLLM also adds the
  actual prompt token to each entry when it is outside the top k; only the k highest are kept.
* ``echo`` (llama.cpp's ``llama_cpp.server``): the prompt is sent as text with ``echo=true``; see
  `_EchoParser` for where its entries land (it differs from the OpenAI convention).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from distill.data.batching import Batch
from distill.errors import DistillError, InputError
from distill.recipe import ServedTeacherConfig
from distill.teachers.base import SparseTeacherSignal, TeacherSource

T = TypeVar("T")

# prompt_logprobs[i] is the distribution of token i: the prediction made at position j is entry j + 1
PROMPT_LOGPROBS_OFFSET = 1
# llama.cpp's echo: after re-inserting the entries it skips for BOS tokens, entry j is the prediction AT j
ECHO_OFFSET = 0
# extra log-probs asked of llama.cpp so that k remain after dropping those keyed by ambiguous text
ECHO_EXTRA = 8
# HTTP statuses worth another try: overload, rate limits, server faults, gateways
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class ServedTeacherError(DistillError):
    """The teacher server could not give a valid answer (after retries); the message names the URL."""


class _Malformed(Exception):
    """A response that parsed as JSON but does not have the promised shape or values."""


@dataclass
class Generation:
    text: str  # the generated continuation (special tokens skipped by the server)
    finished: bool  # True when the model stopped by itself (end of sequence or a stop string)
    token_ids: list[int] | None = None  # generated ids, when the server reports them


@dataclass
class _Segment:
    """One real sequence inside the batch: row `row`, columns [start, end), and which of its positions
    (relative to `start`) are selected."""

    row: int
    start: int
    end: int
    selected: list[int]


# --------------------------------------------------------------------------------------------------
# HTTP with retries


class _Client:
    def __init__(
        self, base_url: str, api_key: str | None, timeout_s: float, max_retries: int, backoff_s: float
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.stopping = threading.Event()  # set when a sibling request failed for good: stop retrying

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def request(self, method: str, path: str, payload: Any, parse: Callable[[Any], T]) -> T:
        """Send one request and parse its JSON answer; retry transport faults, retryable statuses,
        non-JSON bodies and malformed answers with exponential backoff (with jitter)."""
        url = f"{self.base_url}{path}"
        body = None if payload is None else json.dumps(payload).encode()
        last = "no attempt made"
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if attempt:
                delay = self.backoff_s * (2 ** (attempt - 1)) * (1.0 + 0.25 * random.random())
                if self.stopping.wait(delay):
                    raise ServedTeacherError(
                        f"served teacher {url}: gave up ({last}) as another request failed"
                    )
            req = urllib.request.Request(url, data=body, headers=self._headers(), method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                if err.code in _RETRY_STATUS:
                    last = f"HTTP {err.code}: {detail}"
                    continue
                raise ServedTeacherError(
                    f"served teacher {url}: HTTP {err.code}: {detail}{_hint(err.code, detail)}"
                ) from None
            except TimeoutError:
                last = f"no answer within timeout_s={self.timeout_s:g}"
                continue
            except urllib.error.URLError as err:
                reason = err.reason
                if isinstance(reason, TimeoutError | socket.timeout):
                    last = f"no answer within timeout_s={self.timeout_s:g}"
                else:
                    last = f"cannot connect ({_one_line(reason)})"
                continue
            except (http.client.HTTPException, OSError) as err:
                last = f"connection failed ({type(err).__name__}: {_one_line(err)})"
                continue
            try:
                data = json.loads(raw)
            except ValueError:
                last = f"answer is not JSON: {_one_line(raw[:80])}"
                continue
            try:
                return parse(data)
            except _Malformed as err:
                last = f"malformed answer: {err}"
                continue
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
                last = f"malformed answer: {type(err).__name__}: {_one_line(err)}"
                continue
        raise ServedTeacherError(f"served teacher {url} failed after {attempts} attempt(s): {last}")


def _one_line(obj: object, limit: int = 200) -> str:
    text = obj.decode("utf-8", "replace") if isinstance(obj, bytes) else str(obj)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hint(code: int, detail: str) -> str:
    if code in (401, 403):
        return " (check the API key in the variable named by teacher.api_key_env)"
    if code == 404:
        return " (check teacher.base_url, which usually ends in /v1, and teacher.model)"
    if "logprob" in detail.lower():
        return " (the server must allow teacher.top_k log-probs: vLLM's --max-logprobs)"
    return ""


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        raw = err.read()
    except (OSError, http.client.HTTPException):
        return _one_line(err.reason)
    try:
        data = json.loads(raw)
    except ValueError:
        return _one_line(raw) or _one_line(err.reason)
    if isinstance(data, dict):
        inner = data.get("error", data)
        if isinstance(inner, dict) and "message" in inner:
            return _one_line(inner["message"])
        if isinstance(data.get("detail"), str):
            return _one_line(data["detail"])
    return _one_line(raw)


# --------------------------------------------------------------------------------------------------
# response parsing and validation


def _logprob(value: Any, where: str) -> float:
    """A log-prob from JSON: a number <= 0 (up to rounding), -inf allowed; anything else is malformed."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Malformed(f"{where}: log-prob {value!r} is not a number")
    out = float(value)
    if math.isnan(out) or out > 1e-4:
        raise _Malformed(f"{where}: log-prob {out} is not a log-probability")
    return out  # -inf (an impossible token) is fine unless it ends up in the top k: `_top_k` checks


def _top_k(entries: dict[int, float], k: int, vocab_size: int, where: str) -> tuple[list[int], list[float]]:
    """Keep the k highest of {token id: log-prob}, sorted descending (ties by id, so it is deterministic)."""
    need = min(k, vocab_size)
    if len(entries) < need:
        raise _Malformed(f"{where}: {len(entries)} log-probs, expected at least {need}")
    for tid in entries:
        if not 0 <= tid < vocab_size:
            raise _Malformed(f"{where}: token id {tid} outside the vocabulary ({vocab_size})")
    best = sorted(entries.items(), key=lambda kv: (-kv[1], kv[0]))[:need]
    if math.isinf(best[-1][1]):
        raise _Malformed(f"{where}: a top-{need} log-prob is -inf")
    mass = math.fsum(math.exp(lp) for _, lp in best)
    if mass > 1.0 + 1e-3:
        raise _Malformed(f"{where}: top-{need} log-probs sum to probability {mass:.4f} > 1")
    return [t for t, _ in best], [lp for _, lp in best]


def _parse_id_keyed(entry: Any, where: str, prefix: str = "") -> dict[int, float]:
    """vLLM's prompt_logprobs entry {"123": {"logprob": -0.1, ...}} or top_logprobs {"token_id:123": -0.1}."""
    if not isinstance(entry, dict):
        raise _Malformed(f"{where}: expected an object of log-probs, got {type(entry).__name__}")
    out: dict[int, float] = {}
    for key, value in entry.items():
        text = str(key)
        if prefix and text.startswith(prefix):
            text = text[len(prefix) :]
        try:
            tid = int(text)
        except ValueError:
            raise _Malformed(f"{where}: key {key!r} is not a token id") from None
        lp = value.get("logprob") if isinstance(value, dict) else value
        out[tid] = _logprob(lp, where)
    return out


def _first_choice(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _Malformed("answer is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Malformed("no choices in the answer")
    return choices[0]


# --------------------------------------------------------------------------------------------------
# the source


class ServedTeacherSource(TeacherSource):
    """Sparse top-k teacher signal and generation from an OpenAI-compatible server."""

    kind = "served"

    def __init__(self, cfg: ServedTeacherConfig, tokenizer: Any = None) -> None:
        self.cfg = cfg
        api_key: str | None = None
        if cfg.api_key_env:
            api_key = os.environ.get(cfg.api_key_env)
            if not api_key:
                raise InputError(
                    f"teacher.api_key_env: environment variable {cfg.api_key_env} is not set (it should hold "
                    "the served teacher's API key)"
                )
        if tokenizer is None:
            from distill.models.loading import load_tokenizer

            tokenizer = load_tokenizer(cfg.tokenizer)
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.top_k = min(cfg.top_k, self.vocab_size)
        self.client = _Client(cfg.base_url, api_key, cfg.timeout_s, cfg.max_retries, cfg.backoff_s)
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="served-teacher")
        self._closed = False
        self._lock = threading.Lock()
        self._echo: _EchoParser | None = None
        self.echo_unresolved = 0  # echo protocol: top log-probs keyed by ambiguous text, left in the tail

    # ---- plumbing

    def __repr__(self) -> str:  # never shows the API key
        return f"ServedTeacherSource({self.cfg.base_url!r}, model={self.cfg.model!r}, protocol={self.cfg.protocol!r})"

    def _run_all(self, jobs: Sequence[Callable[[], T]]) -> list[T]:
        """Run jobs concurrently (at most max_concurrency in flight); results in job order. The first
        failure stops the others' retries and is raised."""
        if self._closed:
            raise ServedTeacherError(f"served teacher {self.cfg.base_url}: used after close()")
        self.client.stopping.clear()
        futures: list[Future[T]] = [self._pool.submit(job) for job in jobs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            self.client.stopping.set()
            for f in futures:
                f.cancel()
            wait(futures)
            self.client.stopping.clear()
            err = failed.exception()
            assert err is not None
            raise err
        return [f.result() for f in futures]

    def check_server(self) -> list[str]:
        """GET /models: the server answers and serves `cfg.model`. Returns the served model names."""

        def parse(data: Any) -> list[str]:
            items = data.get("data") if isinstance(data, dict) else None
            if not isinstance(items, list):
                raise _Malformed("no model list in the answer")
            return [str(m.get("id")) for m in items if isinstance(m, dict)]

        names = self.client.request("GET", "/models", None, parse)
        if self.cfg.model not in names:
            raise ServedTeacherError(
                f"served teacher {self.cfg.base_url}: model {self.cfg.model!r} is not served (it serves {names})"
            )
        return names

    # ---- the sparse signal

    def signal(self, batch: Batch, select: torch.Tensor) -> SparseTeacherSignal:
        """Top-k teacher log-probs (temperature 1, normalised over the full vocabulary) at the selected
        positions, rows in row-major order."""
        segments = _segments(batch, select)
        ids_cpu = batch.input_ids.detach().cpu()
        jobs = [
            (lambda seg=seg: self._segment_topk(ids_cpu[seg.row, seg.start : seg.end].tolist(), seg.selected))
            for seg in segments
        ]
        results = self._run_all(jobs)
        k = self.top_k
        if results:
            ids = torch.cat([r[0] for r in results])
            lps = torch.cat([r[1] for r in results])
        else:
            ids = torch.zeros((0, k), dtype=torch.long)
            lps = torch.zeros((0, k), dtype=torch.float32)
        expected = int(select.sum())
        if ids.shape != (expected, k):  # an internal invariant: never hand back misaligned rows
            raise ServedTeacherError(
                f"served teacher {self.cfg.base_url}: got {tuple(ids.shape)} rows, expected {(expected, k)}"
            )
        return SparseTeacherSignal(ids=ids, logprobs=lps, temperature=1.0, vocab_size=self.vocab_size)

    def _segment_topk(self, tokens: list[int], selected: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.protocol == "prompt_logprobs":
            rows = self._prompt_logprobs(tokens, selected)
        else:
            rows = self._echo_logprobs(tokens, selected)
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long).reshape(len(rows), self.top_k)
        lps = torch.tensor([r[1] for r in rows], dtype=torch.float32).reshape(len(rows), self.top_k)
        return ids, lps

    def _prompt_logprobs(self, tokens: list[int], selected: list[int]) -> list[tuple[list[int], list[float]]]:
        n = len(tokens)
        last = max(selected)
        needs_next = last == n - 1  # the prediction after the last token: from the generated token
        prompt = tokens[: min(n, last + 1 + PROMPT_LOGPROBS_OFFSET)]
        k = self.top_k
        payload: dict[str, Any] = {
            "model": self.cfg.model,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": k,
        }
        if needs_next:
            payload["logprobs"] = k
            payload["return_tokens_as_token_ids"] = True

        def parse(data: Any) -> list[tuple[list[int], list[float]]]:
            choice = _first_choice(data)
            entries = choice.get("prompt_logprobs")
            if not isinstance(entries, list):
                raise _Malformed("no prompt_logprobs in the answer (does the server support them?)")
            if len(entries) != len(prompt):
                raise _Malformed(f"{len(entries)} prompt positions for a prompt of {len(prompt)} tokens")
            rows = []
            for j in selected:
                where = f"position {j}"
                if j + PROMPT_LOGPROBS_OFFSET < len(prompt):
                    entry = _parse_id_keyed(entries[j + PROMPT_LOGPROBS_OFFSET], where)
                else:
                    logprobs = choice.get("logprobs")
                    tops = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
                    if not isinstance(tops, list) or not tops:
                        raise _Malformed(f"{where}: no top_logprobs for the token after the prompt")
                    entry = _parse_id_keyed(tops[0], where, prefix="token_id:")
                rows.append(_top_k(entry, k, self.vocab_size, where))
            return rows

        return self.client.request("POST", "/completions", payload, parse)

    def _echo_logprobs(self, tokens: list[int], selected: list[int]) -> list[tuple[list[int], list[float]]]:
        with self._lock:
            if self._echo is None:
                self._echo = _EchoParser(self.tokenizer, self.vocab_size)
        echo = self._echo
        # the prediction at j needs tokens <= j; one more keeps it off the end of the echo
        prompt = tokens[: max(selected) + 2]
        payload = echo.payload(self.cfg.model, prompt, self.top_k)

        def parse(data: Any) -> tuple[list[tuple[list[int], list[float]]], int]:
            return echo.rows(data, prompt, selected, self.top_k)

        rows, unresolved = self.client.request("POST", "/completions", payload, parse)
        with self._lock:
            self.echo_unresolved += unresolved
        return rows

    # ---- generation

    def generate(
        self,
        prompts: Sequence[Sequence[int]] | Sequence[str],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = 0,
    ) -> list[Generation]:
        """Continue each prompt (token ids, e.g. a chat prompt, or text); temperature 0 is greedy.
        Prompt i is sampled with seed `seed + i`, so results do not depend on concurrency."""
        jobs = [
            (
                lambda i=i, p=p: self._generate_one(
                    p, max_new_tokens, temperature, top_p, None if seed is None else seed + i
                )
            )
            for i, p in enumerate(prompts)
        ]
        return self._run_all(jobs)

    def _generate_one(
        self,
        prompt: Sequence[int] | str,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> Generation:
        sent: str | list[int]
        if isinstance(prompt, str):
            sent = prompt
        else:
            ids = [int(t) for t in prompt]
            # llama.cpp's server takes text prompts only; vLLM and SGLang take token ids
            sent = ids if self.cfg.protocol == "prompt_logprobs" else self.tokenizer.decode(ids)
        payload: dict[str, Any] = {
            "model": self.cfg.model,
            "prompt": sent,
            "max_tokens": int(max_new_tokens),
            "temperature": float(temperature),
            "top_p": float(top_p),
        }
        if seed is not None:
            payload["seed"] = int(seed)
        if self.cfg.protocol == "prompt_logprobs":
            payload["return_token_ids"] = True  # vLLM >= 0.10.2; servers that do not know it ignore it
        else:
            payload["repeat_penalty"] = (
                1.0  # llama.cpp's server defaults to 1.1: not the model's distribution
            )

        def parse(data: Any) -> Generation:
            choice = _first_choice(data)
            text = choice.get("text")
            if not isinstance(text, str):
                raise _Malformed("no text in the answer")
            reason = choice.get("finish_reason")
            if reason not in ("stop", "length", "eos", None):
                raise _Malformed(f"unexpected finish_reason {reason!r}")
            tids = choice.get("token_ids")
            token_ids = [int(t) for t in tids] if isinstance(tids, list) else None
            if token_ids is not None and len(token_ids) > max_new_tokens:
                raise _Malformed(f"{len(token_ids)} tokens generated, max_tokens was {max_new_tokens}")
            return Generation(text=text, finished=reason in ("stop", "eos"), token_ids=token_ids)

        return self.client.request("POST", "/completions", payload, parse)

    # ---- checks

    @torch.no_grad()
    def check_alignment(self, live_model: Any, batch: Batch, select: torch.Tensor | None = None) -> float:
        """Max |served log-prob - live log-prob| over the served top-k ids at every selected position
        (default: every position that has a target). A one-off check that the server runs the same
        weights and that this protocol's positions line up: ~1e-4 for the same weights in fp32; above 1
        means another model or shifted positions."""
        from distill.data.batching import IGNORE

        if select is None:
            select = batch.targets != IGNORE
        sig = self.signal(batch, select)
        device = next(live_model.parameters()).device
        out = live_model(
            input_ids=batch.input_ids.to(device),
            attention_mask=None if batch.attention_mask is None else batch.attention_mask.to(device),
            position_ids=batch.position_ids.to(device),
            use_cache=False,
        )
        logits = out.logits[select.to(device)][:, : self.vocab_size].float()
        live = torch.log_softmax(logits, dim=-1).cpu()
        live_at = live.gather(1, sig.ids)
        return float((live_at - sig.logprobs).abs().max()) if sig.num_rows else 0.0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.client.stopping.set()
            self._pool.shutdown(wait=True, cancel_futures=True)


def _segments(batch: Batch, select: torch.Tensor) -> list[_Segment]:
    """The real sequences of the batch that hold selected positions, in row-major order.

    Padded batches: the real tokens of row b are its first attention_mask[b].sum() (right padding).
    Packed batches (no attention mask): sequences start where position_ids restart at 0.
    """
    if select.shape != batch.input_ids.shape:
        raise ValueError(
            f"select {tuple(select.shape)} does not match the batch {tuple(batch.input_ids.shape)}"
        )
    sel = select.detach().cpu().bool()
    segments: list[_Segment] = []
    for b in range(sel.shape[0]):
        if batch.attention_mask is not None:
            mask = batch.attention_mask[b].detach().cpu().bool()
            n = int(mask.sum())
            if not bool(mask[:n].all()):
                raise ValueError("served teacher: rows must be right-padded")
            if bool(sel[b, n:].any()):
                raise ValueError(f"served teacher: select covers padding in row {b}")
            bounds = [(0, n)]
        else:
            pos = batch.position_ids[b].detach().cpu()
            starts = [int(i) for i in torch.nonzero(pos == 0).flatten()] + [int(pos.shape[0])]
            if starts[0] != 0:
                raise ValueError(f"served teacher: packed row {b} does not start at position 0")
            bounds = list(zip(starts[:-1], starts[1:], strict=True))
        for start, end in bounds:
            chosen = [int(j) for j in torch.nonzero(sel[b, start:end]).flatten()]
            if chosen:
                segments.append(_Segment(row=b, start=start, end=end, selected=chosen))
    return segments


class _EchoParser:
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

    def payload(self, model: str, tokens: list[int], k: int) -> dict[str, Any]:
        text = self.tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return {
            "model": model,
            "prompt": text,
            "echo": True,
            "logprobs": k + ECHO_EXTRA,
            "max_tokens": 1,
            "temperature": 0.0,
        }

    def rows(
        self, data: Any, tokens: list[int], selected: list[int], k: int
    ) -> tuple[list[tuple[list[int], list[float]]], int]:
        """Rows for the selected positions, and how many entries could not be placed on an id."""
        logprobs = _first_choice(data).get("logprobs")
        if not isinstance(logprobs, dict):
            raise _Malformed("no logprobs in the answer (was the server started with --logits_all true?)")
        echoed, tops = logprobs.get("tokens"), logprobs.get("top_logprobs")
        if not isinstance(echoed, list) or not isinstance(tops, list) or len(echoed) != len(tops):
            raise _Malformed("logprobs.tokens and logprobs.top_logprobs missing or of different lengths")
        lead = 1 if self.bos is not None and tokens and tokens[0] == self.bos else 0
        by_position: dict[int, Any] = {}
        e = 0
        for idx, tid in enumerate(tokens[lead:]):
            if tid == self.bos:
                continue  # llama.cpp skips the entry of every BOS token after the first
            if e >= len(echoed):
                raise _Malformed(f"echo ends after {len(echoed)} tokens; the prompt has {len(tokens)}")
            piece = self.pieces[tid] if 0 <= tid < self.vocab_size else None
            if piece and echoed[e] != piece:
                raise _Malformed(
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
                raise _Malformed(
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


__all__ = ["ECHO_OFFSET", "PROMPT_LOGPROBS_OFFSET", "Generation", "ServedTeacherError", "ServedTeacherSource"]
