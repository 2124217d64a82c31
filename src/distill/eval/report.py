"""The run report: report.md, a self-contained report.html and two PNG plots, written into the run folder.

Everything is read defensively from the summary (eval.json) and the methods' metrics.jsonl, because a report
is written at the end of a long run and must not crash on a missing teacher, missing eval data or an
older summary layout: absent numbers show as "—". Every file is written atomically through distill.io, so
a reader never sees a half-written report.

Summary shape read here (every key optional): name, primary (a method label), teacher, student, data,
selection, timing, before (an eval dict), before_interval, seeds (list), and methods: {label: entry}.
A single-seed entry is {"method": {"name", "label"?}, "after": eval dict, "steps", "train_seconds",
"eval_seconds", "final_loss", "real_tokens_per_s", "padding_fraction", "resumed_from"}, its per-step
metrics in methods/<label>/metrics.jsonl. A multi-seed entry is {"method", "seeds": {"0": single-seed
entry, ...}, "after": mean eval dict, "after_interval": {field: [low, high]}} (distill.stats.summarise_seeds),
its metrics in methods/<label>/seed-<seed>/metrics.jsonl; training rows and timing come from its seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.eval.report_classes import CLASS_PLOT, plot_per_class
from distill.eval.report_columns import declared_columns
from distill.eval.report_doc import Doc, Table, render_markdown
from distill.eval.report_format import as_dict, as_float, fmt_count, fmt_int
from distill.eval.report_html import render_html
from distill.eval.report_plots import plot_kl_by_position, plot_loss_curves
from distill.eval.report_run import method_order, seed_count
from distill.eval.report_tables import (
    has_intervals,
    per_seed_table,
    results_table,
    timing_table,
    training_table,
)
from distill.io import write_text_atomic

LOSS_PLOT = "loss_curves.png"
KL_PLOT = "kl_by_position.png"


def _student_phrase(student: dict[str, Any]) -> str:
    desc = []
    if as_float(student.get("layers")) is not None:
        desc.append(f"{fmt_int(student['layers'])}-layer")
    desc.append("student")
    if as_float(student.get("parameters")) is not None:
        desc.append(f"({fmt_count(student['parameters'])} parameters)")
    if student.get("init"):
        desc.append(f"initialised by `{student['init']}`")
    kept = student.get("kept_layers")
    if isinstance(kept, list) and kept:
        desc.append(f"keeping teacher layers {', '.join(str(k) for k in kept)}")
    return " ".join(desc)


def _method_ref(name: str, summary: dict[str, Any]) -> str:
    """`label`, plus the method it runs when the label is not the method's own name."""
    method = as_dict(as_dict(as_dict(summary.get("methods")).get(name)).get("method")).get("name")
    return f"`{name}` ({method})" if isinstance(method, str) and method != name else f"`{name}`"


def _intro(summary: dict[str, Any], names: list[str]) -> str:
    data = as_dict(summary.get("data"))
    teacher = summary.get("teacher")
    student = _student_phrase(as_dict(summary.get("student")))
    if teacher:
        parts = [f"Distilled the teacher `{teacher}` into a {student}."]
    else:
        parts = [f"Trained a {student} without a teacher model, so no KL against a teacher is measured."]
    if as_float(data.get("train_examples")) is not None:
        train = f"Training data: {fmt_int(data['train_examples'])} prompts"
        extra = []
        if as_float(data.get("train_answer_tokens")) is not None:
            extra.append(f"{fmt_int(data['train_answer_tokens'])} answer tokens")
        if as_float(data.get("train_dropped")):
            extra.append(f"{fmt_int(data['train_dropped'])} dropped")
        parts.append(train + (f" ({'; '.join(extra)})." if extra else "."))
    if as_float(data.get("eval_examples")) is not None:
        tok = data.get("eval_answer_tokens")
        suffix = f" ({fmt_int(tok)} answer tokens)" if as_float(tok) is not None else ""
        parts.append(f"Held-out evaluation: {fmt_int(data['eval_examples'])} prompts{suffix}.")
    if names:
        primary = summary.get("primary")
        others = [n for n in names if n != primary]
        text = f"Primary method {_method_ref(primary, summary)}" if primary in names else "Methods"
        if others:
            text += (" compared against " if primary in names else ": ") + ", ".join(
                _method_ref(n, summary) for n in others
            )
        parts.append(text + ".")
    seeds = summary.get("seeds")
    if isinstance(seeds, list) and len(seeds) > 1:
        parts.append(
            f"Each method was trained once per seed ({len(seeds)} seeds: {', '.join(map(str, seeds))})."
        )
    return " ".join(parts)


def _results(doc: Doc, summary: dict[str, Any], names: list[str]) -> None:
    data = as_dict(summary.get("data"))
    doc.add("h2", "Results on held-out prompts")
    eval_n, eval_tok = as_float(data.get("eval_examples")), as_float(data.get("eval_answer_tokens"))
    where = "held-out prompts"
    if eval_n is not None:
        where = f"{fmt_int(eval_n)} held-out prompts"
        if eval_tok is not None:
            where += f" ({fmt_int(eval_tok)} answer tokens)"
    selection = summary.get("selection") or "not recorded"
    what = f"per-token means over the answer tokens of {where} the student never trained on"
    if declared_columns(summary):
        what = str(summary.get("results_note") or "measured on held-out data the student never trained on")
    doc.add(
        "p",
        f"All numbers are {what}. "
        f"Each method is scored at the final step of its training, with no checkpoint selection "
        f"(**selection:** {selection}). ↓ lower is better, ↑ higher is better.",
    )
    if has_intervals(summary):
        doc.add(
            "p",
            f"Each number is the mean over {seed_count(summary)} seeds, 95 % t interval in brackets: "
            "mean (low–high), a Student-t interval over the per-seed values. A number without brackets "
            "came out the same, to the digits shown, in every seed.",
        )
    if eval_n == 0:
        doc.add("p", "There were no held-out prompts, so the table below has no numbers.")
    doc.add("table", results_table(summary, names))
    methods = as_dict(summary.get("methods"))
    evals = [summary.get("before"), *(as_dict(methods[n]).get("after") for n in names)]
    if not declared_columns(summary) and not any(as_float(as_dict(ev).get("kl")) is not None for ev in evals):
        doc.add("p", "No KL numbers: the run had no teacher signal or no held-out data.")
    per_seed = per_seed_table(summary, names)
    if per_seed is not None:
        doc.add("p", "The same numbers for each seed on its own:")
        doc.add("table", per_seed)


def _sections(doc: Doc, summary: dict[str, Any]) -> None:
    """A family's own sections (e.g. the reasoning data factory's funnel): {title, text, headers, rows},
    cells already formatted."""
    for section in summary.get("sections") or []:
        entry = as_dict(section)
        doc.add("h2", str(entry.get("title", "")))
        if entry.get("text"):
            doc.add("p", str(entry["text"]))
        headers = [str(h) for h in entry.get("headers") or []]
        rows = [[str(c) for c in row] for row in entry.get("rows") or []]
        if headers:
            doc.add("table", Table(headers, rows, ["l"] + ["r"] * (len(headers) - 1)))


def _build(run_dir: Path, summary: dict[str, Any], recipe_yaml: str, plots: dict[str, str]) -> Doc:
    doc = Doc()
    names = method_order(summary)
    doc.add("h1", f"Distillation report: {summary.get('name') or run_dir.name}")
    doc.add("p", _intro(summary, names))
    _results(doc, summary, names)
    _sections(doc, summary)

    doc.add("h2", "Training")
    doc.add(
        "p",
        "All methods start from the same initial student. The loss is each method's own objective, "
        "so final losses are not comparable across methods.",
    )
    doc.add("table", training_table(summary, names))

    doc.add("h2", "Timing")
    doc.add("table", timing_table(summary, names))

    doc.add("h2", "Plots")
    if not plots:
        doc.add("p", "No plots: no training metrics or KL-by-position numbers were found.")
    for file, alt in plots.items():
        doc.add("img", (file, alt))

    doc.add("h2", "Recipe")
    doc.add("p", "The resolved recipe this run used (every default filled in):")
    doc.add("pre", recipe_yaml)
    return doc


def write_report(
    run_dir: Path, summary: dict[str, Any], recipe_yaml: str, extra_plots: dict[str, str] | None = None
) -> None:
    """Write report.md, report.html, loss_curves.png and kl_by_position.png into `run_dir`.

    A plot is skipped (and not referenced) when there is nothing to draw, e.g. no teacher means no KL.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = as_dict(summary)
    names = method_order(summary)
    plots: dict[str, str] = {}
    if plot_loss_curves(run_dir, names, summary, run_dir / LOSS_PLOT):
        plots[LOSS_PLOT] = "Training loss per method"
    if plot_kl_by_position(summary, names, run_dir / KL_PLOT):
        plots[KL_PLOT] = "Held-out KL(teacher‖student) by answer position, before and after training"
    if plot_per_class(summary, names, run_dir / CLASS_PLOT):
        plots[CLASS_PLOT] = (
            "Per-class test accuracy (teacher and methods) and the primary method's confusion matrix"
        )
    plots.update(extra_plots or {})  # a family's own figures, already written into run_dir
    doc = _build(run_dir, summary, recipe_yaml or "", plots)
    write_text_atomic(run_dir / "report.md", render_markdown(doc))
    title = f"Distillation report: {summary.get('name') or run_dir.name}"
    write_text_atomic(run_dir / "report.html", render_html(doc, title))
