"""Task generators: deterministic by seed, well-formed rows, and every reference answer verifies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distill.data.records import read_examples
from distill.errors import InputError
from distill.reasoning.tasks import TASK_NAMES, TaskItem, make_tasks, task_row
from distill.reasoning.verifiers import VERIFIER_NAMES, get_verifier


@pytest.mark.parametrize("task", TASK_NAMES)
def test_same_seed_same_items_other_seed_other_items(task: str) -> None:
    first = make_tasks(task, 20, seed=7)
    assert make_tasks(task, 20, seed=7) == first
    assert make_tasks(task, 5, seed=7) == first[:5]  # a longer list extends a shorter one
    assert make_tasks(task, 20, seed=8) != first
    assert make_tasks(task, 0, seed=7) == []


@pytest.mark.parametrize("task", TASK_NAMES)
def test_items_are_well_formed(task: str) -> None:
    items = make_tasks(task, 120, seed=0)
    distinct = len({it.prompt for it in items})
    assert distinct >= 10
    assert len({it.prompt for it in items[:distinct]}) == distinct, "no repeats before the family runs out"
    for item in items:
        assert isinstance(item, TaskItem) and item.task == task
        assert item.verifier in VERIFIER_NAMES
        assert "Answer:" in item.prompt.splitlines()[-1], "the prompt ends with the answer-format instruction"
        json.dumps(task_row(item))  # rows are plain JSON


def _reference_response(item: TaskItem) -> str:
    if item.verifier == "program":
        return f"```python\n{item.options['reference']}```\nAnswer: {item.options['entry_point']}"
    return f"Let me think.\nAnswer: {item.answer}"


@pytest.mark.parametrize("task", [t for t in TASK_NAMES if t != "programs"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_answers_verify_and_wrong_ones_do_not(task: str, seed: int) -> None:
    for item in make_tasks(task, 30, seed):
        verifier = get_verifier(item.verifier, "task.verifier")
        verdict = verifier.verify(_reference_response(item), item.answer, item.options)
        assert verdict.correct, (item, verdict)
        wrong = "Answer: 1000003" if item.answer.isdigit() else "Answer: zzz"
        assert not verifier.verify(wrong, item.answer, item.options).correct, item


def test_program_items_carry_runnable_tests() -> None:
    """Without executing: the tests call the entry point, and the reference defines it."""
    for item in make_tasks("programs", 30, seed=0):
        name = item.options["entry_point"]
        assert item.answer == "" and item.verifier == "program"
        assert all(line.startswith(f"assert {name}(") for line in item.options["tests"].splitlines())
        assert item.options["reference"].startswith(f"def {name}(")
        assert f"`{name}(" in item.prompt


def test_program_references_pass_and_wrong_programs_fail_in_the_sandbox() -> None:
    sandbox = pytest.importorskip("distill.reasoning.sandbox", reason="sandbox.py not written yet")
    if sandbox.isolation() is None:
        pytest.skip("this machine offers no sandbox isolation")
    verifier = get_verifier("program", "task.verifier")
    items = make_tasks("programs", 12, seed=3)
    for item in items:
        verdict = verifier.verify(_reference_response(item), "", item.options)
        assert verdict.correct, (item, verdict)
    item = items[0]
    name = item.options["entry_point"]
    wrong = f"```python\ndef {name}(*args):\n    return None\n```"
    assert not verifier.verify(wrong, "", item.options).correct


def test_unknown_task_is_one_line_naming_the_field() -> None:
    with pytest.raises(InputError) as err:
        make_tasks("poetry", 3, seed=0)
    assert str(err.value).startswith("factory.tasks: unknown task 'poetry' (known: arithmetic,")
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="^factory.tasks: count"):
        make_tasks("arithmetic", -1, seed=0)


def test_rows_read_back_as_examples(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [task_row(it) for t in TASK_NAMES for it in make_tasks(t, 2, seed=0)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    examples = read_examples(str(path))
    assert [ex.prompt[0]["content"] for ex in examples] == [r["prompt"] for r in rows]
    for ex, row in zip(examples, rows, strict=True):
        assert ex.completion is None
        assert ex.meta == {k: row[k] for k in ("answer", "task", "verifier", "verify")}
