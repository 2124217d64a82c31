"""The run report: report.md, a self-contained report.html and two PNG plots, written into the run folder.

Everything is read defensively from the summary (eval.json) and the methods' metrics.jsonl, because a report
is written at the end of a long run and must not crash on a missing teacher, missing eval data or an
older summary layout: absent numbers show as "—". Every file is written to a temp name and renamed into
place, so a reader never sees a half-written report.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Figures are drawn on bare Figure objects (no pyplot), so importing distill never switches the
# matplotlib backend of a notebook or application that uses it.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

LOSS_PLOT = "loss_curves.png"
KL_PLOT = "kl_by_position.png"
DASH = "—"
BEFORE_LABEL = "student before training"
BEFORE_COLOR = "#8c8c8c"
METHOD_COLORS = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9"]

# ---------------------------------------------------------------------------------------------------------------
# Small helpers: tolerant accessors and number formatting.


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _float(value: Any) -> float | None:
    """A real number or None (bools and strings are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def fmt_num(value: Any, digits: int = 4) -> str:
    """`digits` significant digits; large values as grouped integers so they never turn into 1.2e+04."""
    x = _float(value)
    if x is None:
        return DASH
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:,.0f}"
    if x == 0:
        return "0"
    return f"{x:#.{digits}g}".rstrip(".")  # "#" keeps trailing zeros but can leave "1000."


def fmt_int(value: Any) -> str:
    x = _float(value)
    return DASH if x is None or not math.isfinite(x) else f"{round(x):,}"


def fmt_pct(value: Any) -> str:
    x = _float(value)
    return DASH if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def fmt_ratio(after: Any, before: Any) -> str:
    a, b = _float(after), _float(before)
    if a is None or b is None or b <= 0 or not math.isfinite(a) or not math.isfinite(b):
        return DASH
    r = a / b
    return f"{r:.2f}×" if r >= 0.095 else f"{r:.2g}×"  # two decimals, but never round a big win to 0.00×


def fmt_seconds(value: Any) -> str:
    """Durations a reader can take in at a glance: 42.0 s, 5m 03s, 2h 07m."""
    x = _float(value)
    if x is None or not math.isfinite(x):
        return DASH
    if x < 60:
        return f"{x:.1f} s"
    total = round(x)
    if total < 3600:
        return f"{total // 60}m {total % 60:02d}s"
    return f"{total // 3600}h {total % 3600 // 60:02d}m"


def fmt_count(value: Any) -> str:
    """Parameter counts as 48.0M / 1.20B, which is how model sizes are usually quoted."""
    x = _float(value)
    if x is None or not math.isfinite(x):
        return DASH
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:#.3g}".rstrip(".") + suffix
    return f"{x:.0f}"


def _ppl(nll: Any) -> float | None:
    x = _float(nll)
    return None if x is None or not math.isfinite(x) else math.exp(min(x, 50.0))


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes.


def _tmp_path(path: Path) -> Path:
    # A plain open() (unlike mkstemp's 0600) honours the umask, so the report is as readable as eval.json.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = _tmp_path(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_figure_atomic(fig: Any, path: Path) -> None:
    tmp = _tmp_path(path)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------------------
# Reading the run folder.


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Per-step rows of a metrics.jsonl, sorted by step; a resumed run may repeat steps, the last row wins."""
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write can leave a torn last line
        step = _float(row.get("step")) if isinstance(row, dict) else None
        if step is not None and _float(row.get("loss")) is not None:
            by_step[int(step)] = row
    return [by_step[s] for s in sorted(by_step)]


def _method_order(summary: dict[str, Any]) -> list[str]:
    """Primary method first, then the baselines in the order they ran."""
    names = list(_dict(summary.get("methods")))
    primary = summary.get("primary")
    if primary in names:
        names.remove(primary)
        names.insert(0, primary)
    return names


def _method_label(name: str, summary: dict[str, Any]) -> str:
    return f"{name} (primary)" if name == summary.get("primary") else f"{name} (baseline)"


# ---------------------------------------------------------------------------------------------------------------
# Plots.


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average, so the trend is visible through per-step noise."""
    out: list[float] = []
    acc = 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss_curves(run_dir: Path, names: list[str], summary: dict[str, Any], path: Path) -> bool:
    """One panel per method: KD and CE losses live on different scales, so they never share an axis."""
    series = []
    for name in names:
        rows = [
            r for r in read_metrics(run_dir / "methods" / name / "metrics.jsonl") if math.isfinite(r["loss"])
        ]
        if rows:
            series.append((name, rows))
    if not series:
        return False
    fig = Figure(figsize=(4.6 * len(series), 3.6))
    axes = fig.subplots(1, len(series), squeeze=False)
    for ax, (name, rows) in zip(axes[0], series, strict=True):
        color = METHOD_COLORS[names.index(name) % len(METHOD_COLORS)]
        steps = [int(r["step"]) for r in rows]
        loss = [float(r["loss"]) for r in rows]
        if len(rows) == 1:
            ax.plot(steps, loss, "o", color=color)
        elif len(rows) >= 20:
            ax.plot(steps, loss, color=color, alpha=0.3, linewidth=1, label="per step")
            window = max(2, len(rows) // 20)
            ax.plot(steps, _smooth(loss, window), color=color, linewidth=2, label=f"mean of last {window}")
            ax.legend(fontsize=8, frameon=False)
        else:
            ax.plot(steps, loss, color=color, linewidth=1.8, marker=".")
        has_parts = all("kd" in r and "ce" in r for r in rows)
        ax.set_title(_method_label(name, summary), fontsize=11)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("total loss (kd + ce)" if has_parts else "training loss")
        ax.grid(alpha=0.3)
    fig.suptitle("Training loss (each method on its own scale)", fontsize=12)
    fig.tight_layout()
    _save_figure_atomic(fig, path)
    return True


def _bucket_label(bucket: dict[str, Any]) -> str:
    start, end = fmt_int(bucket.get("start")), bucket.get("end")
    return f"{start}+" if _float(end) is None else f"{start}–{fmt_int(end)}"


def plot_kl_by_position(summary: dict[str, Any], names: list[str], path: Path) -> bool:
    """Grouped bars per answer-position bucket: where in the answer the student drifts from the teacher."""
    groups: list[tuple[str, str, list[Any]]] = []
    before = _dict(summary.get("before")).get("kl_by_position")
    if isinstance(before, list):
        groups.append((BEFORE_LABEL, BEFORE_COLOR, before))
    methods = _dict(summary.get("methods"))
    for i, name in enumerate(names):
        buckets = _dict(_dict(methods.get(name)).get("after")).get("kl_by_position")
        if isinstance(buckets, list):
            groups.append((_method_label(name, summary), METHOD_COLORS[i % len(METHOD_COLORS)], buckets))
    # Buckets keyed by their bounds, in order of first appearance; a bucket with no KL in any group is skipped.
    keys: list[tuple[Any, Any]] = []
    info: dict[tuple[Any, Any], dict[str, Any]] = {}
    values: list[dict[tuple[Any, Any], float]] = []
    for _, _, buckets in groups:
        vals: dict[tuple[Any, Any], float] = {}
        for b in buckets:
            if not isinstance(b, dict):
                continue
            key = (b.get("start"), b.get("end"))
            kl = _float(b.get("kl"))
            if kl is None or not math.isfinite(kl):
                continue
            vals[key] = kl
            if key not in info:
                keys.append(key)
                info[key] = b
        values.append(vals)
    if not keys:
        return False
    fig = Figure(figsize=(max(6.0, 1.1 * len(keys) + 2.5), 4.0))
    ax = fig.subplots()
    width = 0.8 / len(groups)
    for g, ((label, color, _), vals) in enumerate(zip(groups, values, strict=True)):
        xs = [i + (g - (len(groups) - 1) / 2) * width for i, k in enumerate(keys) if k in vals]
        ax.bar(xs, [vals[k] for k in keys if k in vals], width=width, color=color, label=label)
    ticks = []
    for k in keys:
        tokens = info[k].get("tokens")
        ticks.append(
            _bucket_label(info[k]) + (f"\n{fmt_int(tokens)} tok" if _float(tokens) is not None else "")
        )
    ax.set_xticks(range(len(keys)), ticks, fontsize=9)
    ax.set_xlabel("answer position (tokens into the teacher's answer)")
    ax.set_ylabel("KL(teacher ‖ student), nats/token")
    ax.set_title("Held-out KL by answer position", fontsize=12)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9, frameon=False)
    fig.tight_layout()
    _save_figure_atomic(fig, path)
    return True


# ---------------------------------------------------------------------------------------------------------------
# Document model: built once, rendered to both Markdown and HTML so the two never disagree.


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]
    align: list[str] = field(default_factory=list)


@dataclass
class _Doc:
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


def _build(run_dir: Path, summary: dict[str, Any], recipe_yaml: str, plots: dict[str, str]) -> _Doc:
    doc = _Doc()
    name = summary.get("name") or run_dir.name
    names = _method_order(summary)
    methods = _dict(summary.get("methods"))
    before = _dict(summary.get("before"))
    data = _dict(summary.get("data"))
    doc.add("h1", f"Distillation report: {name}")
    doc.add("p", _intro(summary, names))

    doc.add("h2", "Results on held-out prompts")
    eval_n, eval_tok = _float(data.get("eval_examples")), _float(data.get("eval_answer_tokens"))
    where = "held-out prompts"
    if eval_n is not None:
        where = f"{fmt_int(eval_n)} held-out prompts"
        if eval_tok is not None:
            where += f" ({fmt_int(eval_tok)} answer tokens)"
    selection = summary.get("selection") or "not recorded"
    doc.add(
        "p",
        f"All numbers are per-token means over the answer tokens of {where} the student never trained on. "
        f"Each method is scored at the final step of its training, with no checkpoint selection "
        f"(**selection:** {selection}). ↓ lower is better, ↑ higher is better.",
    )
    if eval_n == 0:
        doc.add("p", "There were no held-out prompts, so the table below has no numbers.")
    doc.add("table", _results_table(summary, names, methods, before))
    if not any(
        _float(_dict(m).get("kl")) is not None
        for m in [before, *(_dict(methods[n]).get("after") for n in names)]
    ):
        doc.add("p", "No KL numbers: the run had no teacher signal or no held-out data.")

    doc.add("h2", "Training")
    doc.add(
        "p",
        "All methods start from the same initial student. The loss is each method's own objective, "
        "so final losses are not comparable across methods.",
    )
    doc.add("table", _training_table(summary, names, methods))

    doc.add("h2", "Timing")
    doc.add("table", _timing_table(summary, names, methods))

    doc.add("h2", "Plots")
    if not plots:
        doc.add("p", "No plots: no training metrics or KL-by-position numbers were found.")
    for file, alt in plots.items():
        doc.add("img", (file, alt))

    doc.add("h2", "Recipe")
    doc.add("p", "The resolved recipe this run used (every default filled in):")
    doc.add("pre", recipe_yaml)
    return doc


def _intro(summary: dict[str, Any], names: list[str]) -> str:
    student = _dict(summary.get("student"))
    data = _dict(summary.get("data"))
    teacher = summary.get("teacher")
    parts = []
    desc = []
    if _float(student.get("layers")) is not None:
        desc.append(f"{fmt_int(student['layers'])}-layer")
    desc.append("student")
    if _float(student.get("parameters")) is not None:
        desc.append(f"({fmt_count(student['parameters'])} parameters)")
    if student.get("init"):
        desc.append(f"initialised by `{student['init']}`")
    kept = student.get("kept_layers")
    if isinstance(kept, list) and kept:
        desc.append(f"keeping teacher layers {', '.join(str(k) for k in kept)}")
    if teacher:
        parts.append(f"Distilled the teacher `{teacher}` into a {' '.join(desc)}.")
    else:
        parts.append(
            f"Trained a {' '.join(desc)} without a teacher model, so no KL against a teacher is measured."
        )
    if _float(data.get("train_examples")) is not None:
        train = f"Training data: {fmt_int(data['train_examples'])} prompts"
        extra = []
        if _float(data.get("train_answer_tokens")) is not None:
            extra.append(f"{fmt_int(data['train_answer_tokens'])} answer tokens")
        if _float(data.get("train_dropped")):
            extra.append(f"{fmt_int(data['train_dropped'])} dropped")
        parts.append(train + (f" ({'; '.join(extra)})." if extra else "."))
    if _float(data.get("eval_examples")) is not None:
        tok = data.get("eval_answer_tokens")
        suffix = f" ({fmt_int(tok)} answer tokens)" if _float(tok) is not None else ""
        parts.append(f"Held-out evaluation: {fmt_int(data['eval_examples'])} prompts{suffix}.")
    if names:
        primary = summary.get("primary")
        others = [n for n in names if n != primary]
        text = f"Primary method `{primary}`" if primary in names else "Methods"
        if others:
            text += (" compared against " if primary in names else ": ") + ", ".join(f"`{n}`" for n in others)
        parts.append(text + ".")
    return " ".join(parts)


_RESULT_HEADERS = [
    "model",
    "KL(t‖s) ↓",
    "reverse KL ↓",
    "top-1 agreement ↑",
    "student NLL ↓",
    "perplexity ↓",
    "KL vs before",
]


def _result_row(label: str, ev: dict[str, Any], before_kl: Any) -> list[str]:
    ppl = ev.get("student_ppl")
    if _float(ppl) is None:
        ppl = _ppl(ev.get("student_nll"))
    return [
        label,
        fmt_num(ev.get("kl")),
        fmt_num(ev.get("reverse_kl")),
        fmt_pct(ev.get("top1_agreement")),
        fmt_num(ev.get("student_nll")),
        fmt_num(ppl),
        fmt_ratio(ev.get("kl"), before_kl),
    ]


def _results_table(
    summary: dict[str, Any], names: list[str], methods: dict[str, Any], before: dict[str, Any]
) -> _Table:
    before_kl = before.get("kl")
    label = BEFORE_LABEL if before else f"{BEFORE_LABEL} (not evaluated)"
    rows = [_result_row(label, before, None)]
    rows[0][-1] = "1.00×" if _float(before_kl) else DASH
    for name in names:
        rows.append(
            _result_row(_method_label(name, summary), _dict(_dict(methods[name]).get("after")), before_kl)
        )
    # The teacher's NLL on its own answers is the floor the student's NLL can approach.
    teacher_nll = _float(before.get("teacher_nll"))
    for name in names:
        if teacher_nll is None:
            teacher_nll = _float(_dict(_dict(methods[name]).get("after")).get("teacher_nll"))
    if teacher_nll is not None:
        rows.append(
            [
                "teacher (on its own answers)",
                DASH,
                DASH,
                DASH,
                fmt_num(teacher_nll),
                fmt_num(_ppl(teacher_nll)),
                DASH,
            ]
        )
    return _Table(_RESULT_HEADERS, rows, ["l"] + ["r"] * 6)


def _training_table(summary: dict[str, Any], names: list[str], methods: dict[str, Any]) -> _Table:
    headers = ["method", "steps", "train time", "real tokens/s", "padding", "final loss"]
    resumed = any(_dict(methods[n]).get("resumed_from") is not None for n in names)
    if resumed:
        headers.append("resumed from step")
    rows = []
    for name in names:
        m = _dict(methods[name])
        row = [
            _method_label(name, summary),
            fmt_int(m.get("steps")),
            fmt_seconds(m.get("train_seconds")),
            fmt_num(m.get("real_tokens_per_s"), 3),
            fmt_pct(m.get("padding_fraction")),
            fmt_num(m.get("final_loss")),
        ]
        if resumed:
            r = m.get("resumed_from")
            row.append(fmt_int(r) if _float(r) is not None else (str(r) if r is not None else DASH))
        rows.append(row)
    return _Table(headers, rows, ["l"] + ["r"] * (len(headers) - 1))


_TIMING_LABELS = {
    "load_teacher_s": "load teacher",
    "generate_s": "generate teacher answers",
    "eval_before_s": "evaluate student before training",
    "total_s": "total",
}


def _timing_table(summary: dict[str, Any], names: list[str], methods: dict[str, Any]) -> _Table:
    timing = _dict(summary.get("timing"))
    rows = []
    for key, value in timing.items():
        if key != "total_s":
            label = _TIMING_LABELS.get(key) or key.removesuffix("_s").replace("_", " ")
            rows.append([label, fmt_seconds(value)])
    for name in names:
        m = _dict(methods[name])
        rows.append([f"train {name}", fmt_seconds(m.get("train_seconds"))])
        rows.append([f"evaluate {name}", fmt_seconds(m.get("eval_seconds"))])
    if "total_s" in timing:
        rows.append(["**total**", f"**{fmt_seconds(timing['total_s'])}**"])
    return _Table(["stage", "time"], rows, ["l", "r"])


# ---------------------------------------------------------------------------------------------------------------
# Renderers.


def _fence(text: str) -> str:
    """A code fence longer than any backtick run in `text`, so a recipe can never close it early."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def render_markdown(doc: _Doc) -> str:
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


def render_html(doc: _Doc, title: str) -> str:
    out = []
    for kind, content in doc.blocks:
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{_inline_html(content)}</{kind}>")
        elif kind == "table":
            cls = [' class="num"' if a == "r" else "" for a in content.align]
            cls += [""] * (len(content.headers) - len(cls))
            head = "".join(
                f"<th{c}>{html.escape(h)}</th>" for h, c in zip(content.headers, cls, strict=False)
            )
            body = "\n".join(
                "<tr>"
                + "".join(f"<td{c}>{_inline_html(v)}</td>" for v, c in zip(row, cls, strict=False))
                + "</tr>"
                for row in content.rows
            )
            out.append(f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>")
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


def write_report(run_dir: Path, summary: dict[str, Any], recipe_yaml: str) -> None:
    """Write report.md, report.html, loss_curves.png and kl_by_position.png into `run_dir`.

    A plot is skipped (and not referenced) when there is nothing to draw, e.g. no teacher means no KL.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = _dict(summary)
    names = _method_order(summary)
    plots: dict[str, str] = {}
    if plot_loss_curves(run_dir, names, summary, run_dir / LOSS_PLOT):
        plots[LOSS_PLOT] = "Training loss per method"
    if plot_kl_by_position(summary, names, run_dir / KL_PLOT):
        plots[KL_PLOT] = "Held-out KL(teacher‖student) by answer position, before and after training"
    doc = _build(run_dir, summary, recipe_yaml or "", plots)
    _write_atomic(run_dir / "report.md", render_markdown(doc).encode("utf-8"))
    title = f"Distillation report: {summary.get('name') or run_dir.name}"
    _write_atomic(run_dir / "report.html", render_html(doc, title).encode("utf-8"))
