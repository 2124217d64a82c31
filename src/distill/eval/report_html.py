"""report.html: the report's document rendered as one self-contained page (styles inline, plots beside it)."""

from __future__ import annotations

import html
import re

from distill.eval.report_doc import Doc, Table


def _inline_html(text: str) -> str:
    """Escape, then render the two inline Markdown marks the report uses: `code` and **bold**."""
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1000px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.5; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ddd; padding: .35em .7em; }
th { background: #f4f4f4; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f2f2f2; padding: 0 .25em; border-radius: 3px; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: 1em; overflow-x: auto; }
img { max-width: 100%; display: block; margin: 1em 0; }
""".strip()


def _table_html(table: Table) -> str:
    cls = [' class="num"' if a == "r" else "" for a in table.align]
    cls += [""] * (len(table.headers) - len(cls))
    head = "".join(f"<th{c}>{html.escape(h)}</th>" for h, c in zip(table.headers, cls, strict=False))
    body = "\n".join(
        "<tr>" + "".join(f"<td{c}>{_inline_html(v)}</td>" for v, c in zip(row, cls, strict=False)) + "</tr>"
        for row in table.rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def render_html(doc: Doc, title: str) -> str:
    """A page that opens in any browser with no network: every string escaped, the recipe included."""
    out = []
    for kind, content in doc.blocks:
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{_inline_html(content)}</{kind}>")
        elif kind == "table":
            out.append(_table_html(content))
        elif kind == "img":
            file, alt = content
            out.append(f'<img src="{html.escape(file)}" alt="{html.escape(alt)}">')
        elif kind == "pre":
            out.append(f"<pre><code>{html.escape(content.rstrip())}</code></pre>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
        + "\n".join(out)
        + "\n</body>\n</html>\n"
    )
