"""kd_step benchmark: how figures are taken (clocks, peak RSS) and summarised (median and min-max)."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Spread:
    """Median and min-max of one figure over repetitions."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def fmt(self, digits: int = 2, unit: str = "") -> str:
        lo, hi = min(self.values), max(self.values)
        return f"{self.median:.{digits}f}{unit} ({lo:.{digits}f}-{hi:.{digits}f})"


def ratio(a: list[float], b: list[float]) -> Spread:
    """Per-repetition ratio a/b (both measured in the same repetition)."""
    return Spread([x / y for x, y in zip(a, b, strict=True)])


@dataclass
class LoopRun:
    """Timed steps of one training loop (warm-up steps excluded)."""

    seconds: float
    cpu_seconds: float  # process CPU time over the same steps
    real_tokens: int
    slots: int  # batch elements including padding
    steps: int

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.real_tokens / self.cpu_seconds

    @property
    def step_s(self) -> float:
        return self.seconds / self.steps


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def now() -> tuple[float, float]:
    """(wall, process CPU) seconds."""
    return time.perf_counter(), time.process_time()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (and so ru_maxrss) to the current RSS, so that the peak of model
    loading does not hide the peak of the steps. Linux >= 4.0; returns False where unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak RSS. On Linux that is VmHWM: ru_maxrss is max(VmHWM, the RSS of the process that
    exec'd us), and our parent (holding both models) spawns the workers, so ru_maxrss would only report the
    parent's size."""
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if platform.system() == "Darwin" else kb * 1024
