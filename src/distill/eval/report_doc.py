"""The report's document model and its Markdown rendering.

The report is built once as a list of blocks and rendered to both Markdown and HTML (report_html.py), so
the two files never disagree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    """Cells already formatted as text; `align` holds "l" or "r" per column."""

    headers: list[str]
    rows: list[list[str]]
    align: list[str] = field(default_factory=list)


@dataclass
class Doc:
    """Blocks in order: ("h1"|"h2"|"p", text), ("table", Table), ("img", (file, alt)), ("pre", text)."""

    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def add(self, kind: str, content: Any) -> None:
        self.blocks.append((kind, content))


def format_table(headers: list[str], rows: list[list[str]], align: Sequence[str] | None = None) -> str:
    """A Markdown table padded to column width, so it also reads well as plain text.

    `align` holds "l" or "r" per column (default: all left); short rows are padded with empty cells.
    """
    width = len(headers)
    cells = [[c.replace("|", "\\|").replace("\n", " ") for c in row] for row in [headers, *rows]]
    cells = [row[:width] + [""] * (width - len(row)) for row in cells]
    align = list(align or []) + ["l"] * (width - len(align or []))
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(width)]

    def line(row: list[str]) -> str:
        padded = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align, strict=False)]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "| "
        + " | ".join(
            "-" * (w - 1) + ":" if a == "r" else "-" * w for w, a in zip(widths, align, strict=False)
        )
        + " |"
    )
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _fence(text: str) -> str:
    """A code fence longer than any backtick run in `text`, so a recipe can never close it early."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def render_markdown(doc: Doc) -> str:
    """report.md: readable as plain text too, since tables are padded."""
    out = []
    for kind, content in doc.blocks:
        if kind == "h1":
            out.append(f"# {content}")
        elif kind == "h2":
            out.append(f"## {content}")
        elif kind == "p":
            out.append(content)
        elif kind == "table":
            out.append(format_table(content.headers, content.rows, content.align))
        elif kind == "img":
            file, alt = content
            out.append(f"![{alt}]({file})")
        elif kind == "pre":
            fence = _fence(content)
            out.append(f"{fence}yaml\n{content.rstrip()}\n{fence}")
    return "\n\n".join(out) + "\n"
