"""kd_step benchmark, part 3 (+4): peak-memory rise of a few steps, every variant in a fresh subprocess.

The parent saves the teacher and one fixed batch to a temporary folder, then re-invokes kd_step.py with
the hidden `--_memory-worker KIND --_workdir DIR` arguments; the worker (`memory_worker`) loads them,
runs MEMORY_STEPS steps and prints its figures as one JSON line on stdout.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.data.batching import Batch
from distill.models.loading import fresh_copy
from distill.recipe import load_recipe
from kd_step_data import Pair, build_pair, dense_batch
from kd_step_measure import current_rss_bytes, log, peak_rss_bytes, reset_peak_rss
from kd_step_steps import engine_optimizer, make_step
from kd_step_trl import trl_memory_run

MEMORY_STEPS = 2
MEMORY_KINDS = ("ce_teacher", "kd_forward_kl", "kd_jsd", "hf_ce_teacher", "trl")
TARGET_MEMORY_KINDS = ("ce_teacher", "kd_forward_kl", "kd_jsd")
ENTRY_POINT = Path(__file__).resolve().with_name("kd_step.py")  # the script the workers run

MemoryRises = dict[str, list[int]]  # kind -> bytes, one per repetition it ran in


def prepare_memory_workdir(pair: Pair, batch: Batch, workdir: Path) -> None:
    """Save what the subprocesses load: the teacher (safetensors) and the batch."""
    plain = fresh_copy(pair.teacher)  # GGUF-loaded models refuse save_pretrained
    plain.load_state_dict(pair.teacher.state_dict())
    plain.save_pretrained(workdir / "teacher", safe_serialization=True)
    del plain
    pair.tokenizer.save_pretrained(workdir / "teacher")  # parsing the GGUF again would take seconds
    torch.save({"input_ids": batch.input_ids.cpu(), "targets": batch.targets.cpu()}, workdir / "batch.pt")


def memory_worker(kind: str, workdir: Path, chunk_size: int) -> dict[str, Any]:
    """Runs in a fresh process: load models, build the batch, then measure the rise of 2 steps."""
    recipe = load_recipe("quickstart")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    acc = Accelerator(cpu=device.type == "cpu")
    teacher = AutoModelForCausalLM.from_pretrained(str(workdir / "teacher"), dtype=torch.float32)
    pair = build_pair(recipe, teacher, AutoTokenizer.from_pretrained(str(workdir / "teacher")), device)
    saved = torch.load(workdir / "batch.pt")
    batch = dense_batch(saved["input_ids"], saved["targets"]).to(device)
    if kind == "trl":
        run = trl_memory_run(pair, batch, MEMORY_STEPS, workdir)
    else:
        student = pair.student
        fn = make_step(kind, pair, student, engine_optimizer(student), acc, chunk_size)

        def run() -> None:
            for _ in range(MEMORY_STEPS):
                fn(batch)

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        pre = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        pre = current_rss_bytes()
        reset = reset_peak_rss()
        run()
        peak = peak_rss_bytes()
        how = "peak RSS (VmHWM, reset after loading)" if reset else "peak RSS (includes the loading peak!)"
    return {"kind": kind, "pre": pre, "peak": peak, "rise": peak - pre, "how": how}


def measure_memory(
    pair: Pair, batch: Batch, kinds: list[str], reps: int, chunk_size: int, threads: int | None
) -> MemoryRises:
    """Peak-memory rise of every kind, each run in a fresh subprocess. The kinds with a target (CE + teacher,
    KD) run in every repetition; the others (HF, TRL: information only) in the first, to save time."""
    out: MemoryRises = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="kd_step_mem_") as tmp:
        prepare_memory_workdir(pair, batch, Path(tmp))
        for rep in range(reps):
            for kind in kinds if rep == 0 else [k for k in kinds if k in TARGET_MEMORY_KINDS]:
                rise = _memory_subprocess(kind, tmp, chunk_size, threads)
                if rise is not None:
                    out[kind].append(rise)
    return {k: v for k, v in out.items() if v}


def _memory_subprocess(kind: str, workdir: str, chunk_size: int, threads: int | None) -> int | None:
    cmd = [
        sys.executable,
        str(ENTRY_POINT),
        "--_memory-worker",
        kind,
        "--_workdir",
        workdir,
        "--chunk-size",
        str(chunk_size),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        log(f"memory {kind}: worker failed ({tail})")
        return None
    res = json.loads(lines[-1])
    log(
        f"memory {kind}: pre {res['pre'] / 2**20:.0f} MiB, peak {res['peak'] / 2**20:.0f} MiB, "
        f"rise {res['rise'] / 2**20:.0f} MiB [{res['how']}]"
    )
    return int(res["rise"])
