"""Progress where stderr is not a terminal: plain timestamped lines, not silence until the step ends."""

from __future__ import annotations

import pytest

from distill.cli_progress import RichProgress


def test_plain_lines_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    progress = RichProgress(line_every_s=0.0)
    progress.start("training", 3)
    for step in range(3):
        progress.advance(1, info=f"loss {step}")
    progress.start("evaluating", None)  # starting a new step finishes the previous one
    progress.finish()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("training 0/3  0s  started")
    assert any("training 2/3" in line and "loss 1" in line for line in lines)
    assert any("training 3/3" in line and line.endswith("done") for line in lines)
    assert lines[-1].endswith("done") and "evaluating" in lines[-1]
    progress.finish()  # idempotent: nothing more is printed
    assert capsys.readouterr().err == ""
