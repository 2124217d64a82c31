"""A teacher behind an OpenAI-compatible HTTP server (vLLM, SGLang, llama.cpp's server).

Two services: top-k log-probabilities of given text (the sparse teacher signal for logit distillation),
and generation (sequence-KD data). Requests run in a thread pool of `max_concurrency` workers through
`served_client.Client` (timeouts, retries with backoff); the answers are parsed and checked by the
protocol in `served_protocols`, so a served teacher never hands a loss zeros or silently misaligned rows.
Setup and alignment: ``docs/served-teacher.md``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from distill.configs.teachers import ServedTeacherConfig
from distill.data.batching import IGNORE, Batch
from distill.errors import InputError
from distill.teachers.base import SparseTeacherSignal, TeacherSource
from distill.teachers.served_client import Client, Malformed, ServedTeacherError
from distill.teachers.served_protocols import EchoProtocol, PromptLogprobsProtocol, first_choice

T = TypeVar("T")


@dataclass
class Generation:
    text: str  # the generated continuation (special tokens skipped by the server)
    finished: bool  # True when the model stopped by itself (end of sequence or a stop string)
    token_ids: list[int] | None = None  # generated ids, when the server reports them


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
        self.client = Client(cfg.base_url, api_key, cfg.timeout_s, cfg.max_retries, cfg.backoff_s)
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="served-teacher")
        self._closed = False
        self._lock = threading.Lock()
        self._protocol: PromptLogprobsProtocol | EchoProtocol | None = None
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
                raise Malformed("no model list in the answer")
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
        spans = batch.sequences(select)
        ids_cpu = batch.input_ids.detach().cpu()
        jobs = [
            (lambda s=s: self._sequence_topk(ids_cpu[s.row, s.start : s.end].tolist(), s.selected))
            for s in spans
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

    def _protocol_for_signal(self) -> PromptLogprobsProtocol | EchoProtocol:
        with self._lock:  # the echo protocol decodes the whole vocabulary once: build it on first use
            if self._protocol is None:
                if self.cfg.protocol == "prompt_logprobs":
                    self._protocol = PromptLogprobsProtocol(self.vocab_size)
                else:
                    self._protocol = EchoProtocol(self.tokenizer, self.vocab_size)
            return self._protocol

    def _sequence_topk(self, tokens: list[int], selected: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        payload, parse = self._protocol_for_signal().request(self.cfg.model, tokens, selected, self.top_k)
        rows, unresolved = self.client.request("POST", "/completions", payload, parse)
        if unresolved:
            with self._lock:
                self.echo_unresolved += unresolved
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long).reshape(len(rows), self.top_k)
        lps = torch.tensor([r[1] for r in rows], dtype=torch.float32).reshape(len(rows), self.top_k)
        return ids, lps

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
            choice = first_choice(data)
            text = choice.get("text")
            if not isinstance(text, str):
                raise Malformed("no text in the answer")
            reason = choice.get("finish_reason")
            if reason not in ("stop", "length", "eos", None):
                raise Malformed(f"unexpected finish_reason {reason!r}")
            tids = choice.get("token_ids")
            token_ids = [int(t) for t in tids] if isinstance(tids, list) else None
            if token_ids is not None and len(token_ids) > max_new_tokens:
                raise Malformed(f"{len(token_ids)} tokens generated, max_tokens was {max_new_tokens}")
            return Generation(text=text, finished=reason in ("stop", "eos"), token_ids=token_ids)

        return self.client.request("POST", "/completions", payload, parse)

    # ---- checks

    @torch.no_grad()
    def check_alignment(self, live_model: Any, batch: Batch, select: torch.Tensor | None = None) -> float:
        """Max |served log-prob - live log-prob| over the served top-k ids at every selected position
        (default: every position that has a target). A one-off check that the server runs the same
        weights and that this protocol's positions line up: ~1e-4 for the same weights in fp32; above 1
        means another model or shifted positions."""
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


__all__ = ["Generation", "ServedTeacherSource"]
