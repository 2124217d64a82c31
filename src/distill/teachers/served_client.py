"""HTTP for the served teacher: one JSON request at a time, with a timeout and retries.

Only the standard library is used. Transport faults, overload statuses, non-JSON bodies and answers that
do not have the promised shape are retried with exponential backoff (and jitter); whatever still fails
raises `ServedTeacherError`, one line naming the URL, the last problem and, where it helps, what to check.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from distill.errors import DistillError

T = TypeVar("T")

# HTTP statuses worth another try: overload, rate limits, server faults, gateways
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class ServedTeacherError(DistillError):
    """The teacher server could not give a valid answer (after retries); the message names the URL."""


class Malformed(Exception):
    """A response that parsed as JSON but does not have the promised shape or values (retried)."""


class Client:
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
            except Malformed as err:
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


__all__ = ["Client", "Malformed", "ServedTeacherError"]
