"""The classifier report's figure: per-class test accuracy of the teacher and every method (mean over
seeds), and the confusion matrix of the primary method summed over seeds. Drawn only when the summary
holds per-class numbers, so other families' reports are unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.eval.report_format import as_dict
from distill.eval.report_run import seed_entries
from distill.io import write_with

CLASS_PLOT = "per_class_accuracy.png"


def _seed_evals(entry: dict[str, Any]) -> list[dict[str, Any]]:
    seeds = [as_dict(e.get("after")) for _, e in seed_entries(entry)]
    found = seeds or [as_dict(entry.get("after"))]
    return [e for e in found if isinstance(e.get("per_class_accuracy"), list)]


def plot_per_class(summary: dict[str, Any], names: list[str], path: Path) -> bool:
    methods = as_dict(summary.get("methods"))
    bars: dict[str, list[float]] = {}
    for label, ev in as_dict(summary.get("references")).items():
        if isinstance(as_dict(ev).get("per_class_accuracy"), list):
            bars[label] = list(ev["per_class_accuracy"])
    confusion = None
    for name in names:
        evals = _seed_evals(as_dict(methods.get(name)))
        if not evals:
            continue
        per = [e["per_class_accuracy"] for e in evals]
        bars[name] = [sum(col) / len(col) for col in zip(*per, strict=True)]
        if name == summary.get("primary"):
            mats = [e["confusion"] for e in evals if isinstance(e.get("confusion"), list)]
            confusion = (
                [[sum(m[i][j] for m in mats) for j in range(len(mats[0]))] for i in range(len(mats[0]))]
                if mats
                else None
            )
    if not bars:
        return False
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    ax, cm_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    classes = len(next(iter(bars.values())))
    names_axis = [str(c) for c in (summary.get("class_names") or range(classes))][:classes]
    width = 0.8 / len(bars)
    for k, (label, values) in enumerate(bars.items()):
        ax.bar([i + k * width for i in range(classes)], values, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(classes)], names_axis)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("class")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.legend(fontsize=7)
    if confusion is not None:
        im = cm_ax.imshow(confusion, cmap="Blues")
        cm_ax.set_title(f"confusion of {summary.get('primary')} (summed over seeds)", fontsize=9)
        cm_ax.set_xlabel("predicted")
        cm_ax.set_ylabel("true")
        cm_ax.set_xticks(range(classes), names_axis)
        cm_ax.set_yticks(range(classes), names_axis)
        fig.colorbar(im, ax=cm_ax)
    else:
        cm_ax.axis("off")
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return True
