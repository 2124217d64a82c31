"""Progress reporting hook. The engine reports; only the CLI draws (rich bars)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, label: str, total: int | None) -> None: ...
    def advance(self, n: int = 1, info: str = "") -> None: ...
    def finish(self) -> None: ...
    def log(self, message: str) -> None: ...


class NullProgress:
    """Silent progress for library use and tests."""

    def start(self, label: str, total: int | None) -> None:
        pass

    def advance(self, n: int = 1, info: str = "") -> None:
        pass

    def finish(self) -> None:
        pass

    def log(self, message: str) -> None:
        pass
