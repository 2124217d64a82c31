"""Start vLLM's OpenAI-compatible server (from its own virtual environment, e.g. `.venv-vllm`) on
127.0.0.1 in a new process group, so one signal to the group stops the API server, engine core and
workers. Used by the served-teacher tests and benchmarks; distill itself only talks to a server over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import IO


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_vllm(
    python: Path,
    model_dir: Path,
    port: int,
    log: IO[bytes],
    served_name: str = "smol",
    extra_args: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """vLLM serving `model_dir` in fp32 (CPU build: eager mode, a 2 GiB KV cache), offline, no usage stats."""
    env = dict(
        os.environ, VLLM_CPU_KVCACHE_SPACE="2", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1"
    )
    cmd = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", served_name,
        "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--max-logprobs", "64",
        "--host", "127.0.0.1", "--port", str(port), *extra_args,
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
