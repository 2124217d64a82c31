"""Progress for people: rich bars on a terminal, timestamped plain lines in logs and pipes."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class RichProgress:
    """Progress bars for every long step (loading, generation, training, evaluation). Where stderr is not
    a terminal (CI logs, `nohup`), bars would print nothing until a step ends: plain timestamped lines
    instead, at the start, every `line_every_s` seconds, and at the end of each step."""

    def __init__(self, line_every_s: float = 30.0) -> None:
        self._bar: Progress | None = None
        self._task: int | None = None
        self._plain = not console.is_terminal
        self._line_every_s = line_every_s
        self._label, self._done, self._info = "", 0, ""
        self._total: int | None = None
        self._t0 = self._last = 0.0

    def start(self, label: str, total: int | None) -> None:
        self.finish()
        if self._plain:
            self._label, self._total, self._done, self._info = label, total, 0, ""
            self._t0 = self._last = time.monotonic()
            self._line("started")
            return
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(label, total=total, info="")

    def advance(self, n: int = 1, info: str = "") -> None:
        if self._plain and self._label:
            self._done, self._info = self._done + n, info
            if time.monotonic() - self._last >= self._line_every_s:
                self._line("")
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=n, info=info)  # type: ignore[arg-type]

    def finish(self) -> None:
        if self._plain and self._label:
            self._line("done")
            self._label = ""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            self._task = None

    def log(self, message: str) -> None:
        console.print(f"[dim]{message}[/dim]")

    def _line(self, state: str) -> None:
        self._last = time.monotonic()
        count = f" {self._done}/{self._total}" if self._total else (f" {self._done}" if self._done else "")
        parts = [
            f"{time.strftime('%H:%M:%S')} {self._label}{count}",
            f"{self._last - self._t0:.0f}s",
            self._info,
            state,
        ]
        console.print("  ".join(p for p in parts if p), markup=False, highlight=False)
