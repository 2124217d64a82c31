"""The run report: files appear, plots are real PNGs, numbers and labels are right, and it survives gaps."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from distill.eval.report import fmt_num, fmt_ratio, format_table, read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RECIPE = "name: quickstart\nmethod:\n  name: logit_kd\n"


def _eval(kl: float, scale: float = 1.0) -> dict[str, Any]:
    buckets = [0, 8, 16, 32, 64, 128, 256]
    return {
        "tokens": 7000,
        "sequences": 126,
        "student_nll": 4.1 * scale,
        "student_ppl": math.exp(4.1 * scale),
        "kl": kl,
        "reverse_kl": 0.9 * kl,
        "top1_agreement": 0.31 / scale,
        "teacher_nll": 0.9,
        "kl_by_position": [
            {
                "start": lo,
                "end": buckets[i + 1] if i + 1 < len(buckets) else None,
                "tokens": 0 if lo >= 256 else 1000,
                "kl": None if lo >= 256 else kl * (1.2 - 0.1 * i),
            }
            for i, lo in enumerate(buckets)
        ],
    }


def _method(name: str, kl: float) -> dict[str, Any]:
    return {
        "method": {"name": name},
        "after": _eval(kl, scale=0.5),
        "steps": 120,
        "train_seconds": 300.0,
        "eval_seconds": 20.0,
        "resumed_from": None,
        "final_loss": 0.8,
        "real_tokens_per_s": 900.0,
        "padding_fraction": 0.05,
    }


@pytest.fixture
def summary() -> dict[str, Any]:
    return {
        "name": "quickstart",
        "primary": "logit_kd",
        "teacher": "/models/SmolLM2.gguf",
        "student": {
            "init": "prune",
            "kept_layers": [0, 6, 12, 17, 23, 29],
            "parameters": 48_000_000,
            "layers": 6,
        },
        "data": {
            "train_examples": 450,
            "train_dropped": 0,
            "eval_examples": 126,
            "train_answer_tokens": 25000,
            "eval_answer_tokens": 7000,
        },
        "before": _eval(2.0),
        # seq_kd listed first: the primary must still come first in the report.
        "methods": {"seq_kd": _method("seq_kd", 1.0), "logit_kd": _method("logit_kd", 0.5)},
        "timing": {"load_teacher_s": 20.0, "generate_s": 150.0, "eval_before_s": 20.0, "total_s": 700.0},
        "selection": "final step of each method; held-out data is never used for selection",
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    for name, parts in (("logit_kd", ("kd", "ce")), ("seq_kd", ("ce",))):
        folder = tmp_path / "methods" / name
        folder.mkdir(parents=True)
        rows = []
        for step in range(1, 61):
            values = {p: (3.0 if p == "kd" else 1.0) / step**0.5 for p in parts}
            rows.append(
                {"step": step, "loss": sum(values.values()), **values, "lr": 1e-4, "real_tokens_per_s": 900.0}
            )
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000


def test_full_report(run_dir: Path, summary: dict[str, Any]) -> None:
    write_report(run_dir, summary, RECIPE)
    for name in ("report.md", "report.html"):
        assert (run_dir / name).is_file()
    _assert_png(run_dir / "loss_curves.png")
    _assert_png(run_dir / "kl_by_position.png")
    assert not list(run_dir.glob(".*tmp")), "temp files must be renamed into place"

    md = (run_dir / "report.md").read_text(encoding="utf-8")
    assert md.startswith("# Distillation report: quickstart")
    assert "student before training" in md
    assert "logit_kd (primary)" in md and "seq_kd (baseline)" in md
    assert md.index("logit_kd (primary)") < md.index("seq_kd (baseline)")
    assert "0.25×" in md and "0.50×" in md  # KL after / before: 0.5/2.0 and 1.0/2.0
    assert "held-out" in md and summary["selection"] in md
    assert "teacher (on its own answers)" in md and "0.9000" in md
    assert "48.0M" in md and "/models/SmolLM2.gguf" in md
    assert "![" in md and "(loss_curves.png)" in md and "(kl_by_position.png)" in md
    assert "```yaml\n" + RECIPE + "```" in md
    assert "5m 00s" in md and "5.0%" in md  # train time, padding fraction

    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    assert 'src="loss_curves.png"' in page and 'src="kl_by_position.png"' in page
    assert "0.25×" in page and "logit_kd (primary)" in page


def test_missing_teacher_and_before(tmp_path: Path, summary: dict[str, Any]) -> None:
    """No teacher, no before-eval, no metrics files: still a report, with gaps shown as dashes."""
    bare = copy.deepcopy(summary)
    bare["before"] = None
    bare["teacher"] = None
    for m in bare["methods"].values():
        m["after"] = {"tokens": 7000, "sequences": 126, "student_nll": 2.0, "student_ppl": math.exp(2.0)}
    write_report(tmp_path, bare, RECIPE)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "student before training" in md and "logit_kd (primary)" in md
    assert "without a teacher" in md
    assert "×" not in md.split("## Training")[0].split("| model")[1]  # no ratio without a before KL
    assert not (tmp_path / "kl_by_position.png").exists()
    assert (tmp_path / "report.html").is_file()


def test_almost_empty_summary(tmp_path: Path) -> None:
    write_report(tmp_path, {}, "")
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.html").is_file()
    write_report(tmp_path, {"methods": {"x": None}, "before": "junk", "timing": None}, "")
    assert "x (baseline)" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_html_escapes_recipe(tmp_path: Path, summary: dict[str, Any]) -> None:
    write_report(tmp_path, summary, "name: '<script>alert(1)</script>'\n")
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_recipe_with_backticks_stays_fenced(tmp_path: Path) -> None:
    recipe = "note: |\n  ```\n  not the end\n"
    write_report(tmp_path, {}, recipe)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "````yaml\n" + recipe + "````" in md


def test_read_metrics_tolerates_resume_and_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo'
    )
    rows = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 3.0), (2, 1.5)]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_formatting() -> None:
    assert fmt_ratio(0.5, 2.0) == "0.25×"
    assert (
        fmt_ratio(1.0, 2.4) == "0.42×" and fmt_ratio(0.01, 2.0) == "0.005×" and fmt_ratio(3.0, 2.0) == "1.50×"
    )
    assert fmt_ratio(0.5, None) == "—" and fmt_ratio(0.5, 0.0) == "—"
    assert fmt_num(3.2) == "3.200" and fmt_num(60.3) == "60.30" and fmt_num(12345.6) == "12,346"
    assert fmt_num(999.96) == "1000" and fmt_num(None) == "—"
    table = format_table(["a", "b"], [["x|y", "1"], ["z"]], align=["l", "r"])
    lines = table.splitlines()
    assert lines[1] == "| ---- | --: |" and "x\\|y" in lines[2] and len({len(line) for line in lines}) == 1
