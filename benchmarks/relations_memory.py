#!/usr/bin/env python
"""Memory of MiniLM-style relation distillation against the number of distilled layers.

    python benchmarks/relations_memory.py              # B=8, T=256, layers 1 2 4 8; about a minute on 2 cores
    python benchmarks/relations_memory.py --quick      # B=2, T=128: a smoke run
    python benchmarks/relations_memory.py --out docs/benchmarks/relations_memory.md

Per distilled layer: random leaf queries/keys/values for a student (width 384, 6 attention heads) that
require grad, and a teacher (width 576, 9 query heads sharing 3 key/value heads, keys and values widened
with `expand_kv`) that does not, as under `no_grad`; two relation terms (queries x keys, values x values)
with 12 relation heads (head width 32 for the student, 48 for the teacher). All layers' terms are summed,
then one backward. `relation_kl` keeps every term's `(B, heads, T, T)` tensors until backward;
`relation_kl_checkpointed` keeps only the inputs and recomputes one term at a time.

Reported per configuration, each in a fresh subprocess (this script with `--_worker`):
(a) bytes autograd saved for backward, seen by `torch.autograd.graph.saved_tensors_hooks` and
de-duplicated by storage, the inputs excluded (under non-reentrant checkpointing autograd saves nothing
of the relations: the recompute closure holds the inputs);
(b) peak RSS rise: RSS after building the inputs (and zeroed input gradients) is the baseline, the
kernel's peak mark is reset there (`/proc/self/clear_refs`) and read back as `VmHWM` after backward
(`ru_maxrss` would carry over the parent's peak). Workers run with `MALLOC_MMAP_THRESHOLD_` fixed so
that freed tensors go back to the system and the peak is that of live tensors. CPU only.
"""

# ruff: noqa: E402 - the OpenMP setting below must precede the first torch import
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from distill.losses.representation import expand_kv, relation_kl, relation_kl_checkpointed
from kd_step_measure import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from report_output import emit

STUDENT = {"width": 384, "heads": 6, "kv_heads": 6}
TEACHER = {"width": 576, "heads": 9, "kv_heads": 3}
RELATION_HEADS = 12  # divides both widths: 384 / 12 = 32, 576 / 12 = 48
LAYERS = (1, 2, 4, 8)
MODES = {"plain": relation_kl, "checkpointed": relation_kl_checkpointed}
MiB = 2**20


def _masks(b: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows of random length (at least half of T); the answer is the second half of each."""
    lengths = torch.randint(n // 2, n + 1, (b,), generator=gen)
    pos = torch.arange(n)
    keys = pos < lengths[:, None]
    return keys, keys & (pos >= lengths[:, None] // 2)


def _layer_inputs(b: int, n: int, gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(student q, k, v leaves with grad), (teacher q, expanded k, expanded v without grad)."""
    s_width, t_width = STUDENT["width"], TEACHER["width"]
    t_kv = t_width // TEACHER["heads"] * TEACHER["kv_heads"]
    student = [torch.randn(b, n, s_width, generator=gen).requires_grad_(True) for _ in range(3)]
    tq = torch.randn(b, n, t_width, generator=gen)
    tk, tv = (torch.randn(b, n, t_kv, generator=gen) for _ in range(2))
    teacher = [tq] + [expand_kv(x, TEACHER["heads"], TEACHER["kv_heads"]) for x in (tk, tv)]
    return student, teacher


def _warm_up(fn: Any) -> None:
    """The first call pays one-off costs (lazy imports, allocator set-up) that are no part of the step."""
    x = torch.randn(1, 4, 12, requires_grad=True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    fn(x, x, x.detach(), x.detach(), mask, mask, RELATION_HEADS).backward()


def worker(mode: str, layers: int, b: int, n: int) -> dict[str, Any]:
    """Runs in a fresh process: build the inputs, then measure one forward + backward of all layers."""
    gen = torch.Generator().manual_seed(0)
    keys, queries = _masks(b, n, gen)
    inputs = [_layer_inputs(b, n, gen) for _ in range(layers)]
    for student, _ in inputs:
        for x in student:
            x.grad = torch.zeros_like(x)  # accumulated in place: the rise is not the gradients' storage
    exclude = {x.untyped_storage().data_ptr() for s, t in inputs for x in (*s, *t)}
    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        ptr = x.untyped_storage().data_ptr()
        if ptr not in exclude:
            saved[ptr] = x.untyped_storage().nbytes()
        return x

    fn = MODES[mode]
    _warm_up(fn)
    gc.collect()
    pre = current_rss_bytes()
    reset = reset_peak_rss()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        total = torch.zeros(())
        for (sq, sk, sv), (tq, tk, tv) in inputs:
            total = total + fn(sq, sk, tq, tk, keys, queries, RELATION_HEADS)
            total = total + fn(sv, sv, tv, tv, keys, queries, RELATION_HEADS)
    total.backward()
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    grad_norm = sum(float(x.grad.norm()) for s, _ in inputs for x in s if x.grad is not None)
    return {
        "mode": mode,
        "layers": layers,
        "saved": sum(saved.values()),
        "rise": peak - pre,
        "reset": reset,
        "seconds": seconds,
        "loss": float(total),
        "grad_norm": grad_norm,
    }


def run_worker(mode: str, layers: int, b: int, n: int, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_worker", mode, "--_layers", str(layers)]
    cmd += ["--batch", str(b), "--length", str(n), "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_=str(1 << 16))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"worker {mode} x{layers} failed: {tail}")
    return dict(json.loads(lines[-1]))


def report(results: dict[tuple[str, int], dict[str, Any]], b: int, n: int, threads: int) -> list[str]:
    relation_mib = b * RELATION_HEADS * n * n * 4 / MiB
    lines = [
        f"# Relation distillation memory: B={b}, T={n}, {RELATION_HEADS} relation heads, float32, "
        f"{threads} thread(s)",
        "",
        f"Student width {STUDENT['width']} ({STUDENT['heads']} heads), teacher width {TEACHER['width']} "
        f"({TEACHER['heads']} query / {TEACHER['kv_heads']} key-value heads, `expand_kv`); per layer the "
        f"relations queries x keys and values x values. One `(B, heads, T, T)` float32 tensor: "
        f"{relation_mib:.1f} MiB.",
        "",
        "| layers | plain saved MiB | checkpointed saved MiB | plain peak MiB | checkpointed peak MiB "
        "| plain s | checkpointed s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layers in sorted({k[1] for k in results}):
        p, c = results["plain", layers], results["checkpointed", layers]
        lines.append(
            f"| {layers} | {p['saved'] / MiB:.1f} | {c['saved'] / MiB:.1f} | {p['rise'] / MiB:.0f} "
            f"| {c['rise'] / MiB:.0f} | {p['seconds']:.2f} | {c['seconds']:.2f} |"
        )
        for key in ("loss", "grad_norm"):  # the two modes must agree (same inputs, same seed)
            if abs(p[key] - c[key]) > 1e-4 * max(1.0, abs(p[key])):
                lines.append(f"\n**{key} differs at {layers} layers: {p[key]} vs {c[key]}**")
    if not all(r["reset"] for r in results.values()):
        lines.append("\n(peak RSS could not be reset: the peaks include process start-up)")
    lines += [
        "",
        "Saved: bytes autograd keeps for backward (inputs excluded). Peak: RSS rise during the step.",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="B=2, T=128 (a smoke run)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 8; 2 with --quick)")
    ap.add_argument(
        "--length", type=int, default=None, help="sequence length (default 256; 128 with --quick)"
    )
    ap.add_argument("--layers", type=int, nargs="+", default=list(LAYERS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    ap.add_argument("--_worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--_layers", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    b = args.batch or (2 if args.quick else 8)
    n = args.length or (128 if args.quick else 256)
    torch.set_num_threads(args.threads)
    if args._worker:
        print(json.dumps(worker(args._worker, args._layers, b, n)), flush=True)
        return
    results = {}
    for layers in args.layers:
        for mode in MODES:
            res = run_worker(mode, layers, b, n, args.threads)
            print(
                f"[{time.strftime('%H:%M:%S')}] {mode} x{layers}: saved {res['saved'] / MiB:.1f} MiB, "
                f"peak rise {res['rise'] / MiB:.0f} MiB, {res['seconds']:.2f} s",
                file=sys.stderr,
                flush=True,
            )
            results[mode, layers] = res
    emit(report(results, b, n, args.threads), args.out)


if __name__ == "__main__":
    main()
