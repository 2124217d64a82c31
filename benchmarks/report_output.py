"""Print a benchmark's markdown report and, if asked, write it (folders made as needed)."""

from __future__ import annotations

from pathlib import Path


def emit(lines: list[str], markdown: Path | None) -> None:
    text = "\n".join(lines)
    print(text)
    if markdown:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(text + "\n", encoding="utf-8")
