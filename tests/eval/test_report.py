"""The run report: files appear, plots are real PNGs, numbers and labels are right, and it survives gaps."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from distill.eval.report import write_report
from distill.eval.report_doc import format_table
from distill.eval.report_format import fmt_num, fmt_ratio
from distill.eval.report_run import read_metrics
from distill.eval.report_text import summary_lines
from distill.stats import summarise_seeds

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


def _multi_seed_method(name: str, kls: list[float], method: dict[str, Any]) -> dict[str, Any]:
    """The multi-seed entry shape: per-seed entries under "seeds", the mean eval and its t interval."""
    seeds = {str(s): {**_method(name, kl), "method": method} for s, kl in enumerate(kls)}
    summary = summarise_seeds({s: e["after"] for s, e in seeds.items()})
    return {"method": method, "seeds": seeds, "after": summary["mean"], "after_interval": summary["interval"]}


@pytest.fixture
def multi_summary(summary: dict[str, Any]) -> dict[str, Any]:
    multi = copy.deepcopy(summary)
    multi["seeds"] = [0, 1, 2]
    multi["methods"] = {
        "logit_kd": _multi_seed_method("logit_kd", [0.4, 0.5, 0.6], {"name": "logit_kd"}),
        "jsd_t2": _multi_seed_method("jsd_t2", [0.9, 1.0, 1.4], {"name": "jsd", "label": "jsd_t2"}),
    }
    before = summarise_seeds({"0": _eval(2.0), "1": _eval(2.2), "2": _eval(1.8)})
    multi["before"], multi["before_interval"] = before["mean"], before["interval"]
    return multi


def test_multi_seed_report(tmp_path: Path, multi_summary: dict[str, Any]) -> None:
    for name in ("logit_kd", "jsd_t2"):
        for seed in range(3):
            folder = tmp_path / "methods" / name / f"seed-{seed}"
            folder.mkdir(parents=True)
            rows = [{"step": s, "loss": (1.0 + 0.1 * seed) / s**0.5} for s in range(1, 41)]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(tmp_path, multi_summary, RECIPE)
    _assert_png(tmp_path / "loss_curves.png")
    _assert_png(tmp_path / "kl_by_position.png")
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "mean over 3 seeds, 95 % t interval" in md
    assert "`logit_kd` compared against `jsd_t2` (jsd)" in md and "(3 seeds: 0, 1, 2)" in md
    results = md.split("## Training")[0]
    # KL over seeds [0.4, 0.5, 0.6]: mean 0.5, half-width 4.3027 * 0.1 / sqrt(3) = 0.2484
    row = next(line for line in results.splitlines() if line.startswith("| logit_kd (primary) "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0.5000 (0.2516–0.7484)" and cells[2] == "0.4500 (0.2264–0.6736)"
    assert cells[3] == "62.0%" and cells[4] == "2.050"  # the same in every seed: no zero-width brackets
    assert cells[6] == "0.25×"  # ratio of the means, 0.5 / 2.0
    # before: KL over [2.0, 2.2, 1.8], half-width 4.3027 * 0.2 / sqrt(3) = 0.4968
    assert "2.000 (1.503–2.497)" in results
    assert "logit_kd (primary), seed 2" in results and "jsd_t2 (baseline), seed 0" in results
    training = md.split("## Training")[1].split("## Timing")[0]
    assert training.count(", seed ") == 6
    timing = md.split("## Timing")[1].split("## Plots")[0]
    assert "train logit_kd (3 seeds)" in timing and "15m 00s" in timing  # 3 x 300 s


def test_single_seed_report_has_no_interval_line(run_dir: Path, summary: dict[str, Any]) -> None:
    write_report(run_dir, summary, RECIPE)
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "t interval" not in md and ", seed " not in md and "–0." not in md.split("## Training")[0]


def test_importing_the_report_does_not_import_matplotlib_or_torch() -> None:
    """The pipeline and the CLI import these at start-up; plotting libraries load only to draw."""
    code = (
        "import sys, distill.eval.report, distill.eval.report_text, distill.stats; "
        "print(sorted(m for m in ('matplotlib', 'torch', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_summary_lines(summary: dict[str, Any], multi_summary: dict[str, Any]) -> None:
    lines = summary_lines(summary)
    assert len(lines) == 4 and lines[0].split()[:3] == ["model", "KL", "reverse"]
    assert lines[1].startswith("student before training") and lines[2].startswith("logit_kd ")
    assert lines[3].startswith("seq_kd ") and "±" not in "".join(lines)
    assert lines[2].split()[1:] == ["0.5000", "0.4500", "62.0%", "2.050"]
    assert len({len(line) for line in lines}) == 1  # columns line up
    multi = summary_lines(multi_summary)
    assert multi[1].startswith("student before training") and "2.000 ± 0.50" in multi[1]
    assert multi[2].startswith("logit_kd ") and multi[3].startswith("jsd_t2 ")
    assert "0.5000 ± 0.25" in multi[2] and "62.0% ± 0.0%" in multi[2]
    assert len(summary_lines({})) == 1 and summary_lines({})[0].startswith("model")


def test_family_declared_columns_replace_the_lm_table(tmp_path: Path) -> None:
    """A family that declares its own result columns (a classifier's accuracy) gets them in the report
    and the CLI lines, with seed intervals, and none of the LM family's KL columns."""
    from distill.eval.report_text import summary_lines

    def entry(acc: float) -> dict:
        return {
            "method": {"name": "kd"},
            "after": {"accuracy": acc, "ce": 0.5},
            "steps": 3,
            "train_seconds": 1.0,
        }

    summary = {
        "name": "toy",
        "primary": "kd",
        "columns": [
            {"key": "accuracy", "title": "accuracy", "format": "pct", "better": "higher"},
            {"key": "ce", "title": "test CE", "format": "num", "better": "lower"},
        ],
        "results_note": "means over 100 held-out images",
        "seeds": [0, 1],
        "before": {"accuracy": 0.25, "ce": 1.4},
        "methods": {
            "kd": {
                "method": {"name": "kd"},
                "seeds": {"0": entry(0.9), "1": entry(0.8)},
                "after": {"accuracy": 0.85, "ce": 0.5},
                "after_interval": {"accuracy": [0.2147, 1.4853]},
            }
        },
    }
    write_report(tmp_path, summary, "name: toy\n")
    md = (tmp_path / "report.md").read_text()
    assert "accuracy ↑" in md and "test CE ↓" in md and "KL(t‖s)" not in md
    assert "85.0% (21.5%–148.5%)" in md and "means over 100 held-out images" in md
    assert "kd (primary), seed 1 |      80.0%" in md
    lines = summary_lines(summary)
    assert lines[0].split() == ["model", "accuracy", "test", "CE"]
    assert "85.0% ± 63.5%" in lines[-1]
