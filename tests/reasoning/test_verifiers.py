"""Verifiers: answer extraction, number parsing, normalised and regex matching, program checks."""

from __future__ import annotations

import math
import sys
import types
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.errors import InputError
from distill.reasoning import verifiers
from distill.reasoning.verifiers import (
    VERIFIER_NAMES,
    Verdict,
    answer_text,
    extract_code,
    get_verifier,
    parse_number,
    split_rationale,
)

NUMERIC = get_verifier("numeric", "task.verifier")
STRING = get_verifier("string", "task.verifier")
REGEX = get_verifier("regex", "task.verifier")


def test_split_rationale_takes_the_last_answer_marker() -> None:
    text = "First I thought Answer: 3.\nThen 4 + 5 = 9.\n**Answer:** 9"
    rationale, answer = split_rationale(text)
    assert answer == "9"
    assert rationale == "First I thought Answer: 3.\nThen 4 + 5 = 9."
    assert split_rationale("no marker here") == ("no marker here", None)
    assert split_rationale("ANSWER:\n\n  twelve\n") == ("", "twelve")
    assert split_rationale("reasoning\nAnswer:") == ("reasoning", "")
    assert split_rationale("I can't answer: it is unclear")[1] == "it is unclear"
    assert split_rationale("the answers are: 3")[1] is None  # "answers" is not the marker


@pytest.mark.parametrize(
    ("response", "reference"),
    [
        ("7 + 5 = 12\nAnswer: 12", "12"),
        ("Answer: 12 apples.", "12"),
        ("answer: 3 * 60 = 180", "180"),  # the result of a worked line
        ("Answer: 7\nwait, no.\nAnswer: 8", "8"),  # the last answer line wins
        ("So he has 4, then 9 left", "9"),  # no marker: the last number
        ("Answer: 1, 2, 3", "1"),  # the answer line's first number
    ],
)
def test_numeric_finds_the_answer_number(response: str, reference: str) -> None:
    assert NUMERIC.verify(response, reference, {}) == Verdict(True, reference, "ok")


@pytest.mark.parametrize(
    ("written", "extracted", "reference"),
    [
        ("1,234", "1,234", "1234"),
        ("-7", "-7", "-7"),
        ("\u22127", "\u22127", "-7"),
        ("3/4", "3/4", "0.75"),
        (".5", ".5", "0.5"),
        ("$2.50", "2.50", "2.5"),
        ("2.5m", "2.5", "2.5"),
    ],
)
def test_numeric_reads_number_forms(written: str, extracted: str, reference: str) -> None:
    assert NUMERIC.verify(f"Answer: {written}", reference, {}) == Verdict(True, extracted, "ok")


def test_numeric_wrong_answer_keeps_what_it_read() -> None:
    assert NUMERIC.verify("Answer: 13", "12", {}) == Verdict(False, "13", "wrong")
    assert NUMERIC.verify("Answer: 8\nhmm\nAnswer: 7", "8", {}) == Verdict(False, "7", "wrong")


def test_numeric_without_answer_or_number() -> None:
    assert NUMERIC.verify("I do not know", "3", {}) == Verdict(False, None, "no answer")
    assert NUMERIC.verify("it is 3", "3", {"fallback_last_number": False}).reason == "no answer"
    assert NUMERIC.verify("Answer: many", "3", {}) == Verdict(False, "many", "not a number")
    assert NUMERIC.verify("Answer: 1/0", "3", {}).reason == "not a number"


def test_numeric_tolerances() -> None:
    assert NUMERIC.verify("Answer: 0.3333", "1/3", {"tolerance": 1e-3}).correct
    assert not NUMERIC.verify("Answer: 0.3333", "1/3", {}).correct
    assert NUMERIC.verify("Answer: 1001", "1000", {"rel_tolerance": 2e-3}).correct
    assert not NUMERIC.verify("Answer: 1003", "1000", {"rel_tolerance": 2e-3}).correct


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"tolerance": -1}, "verify.tolerance"),
        ({"tolerance": "small"}, "verify.tolerance"),
        ({"fallback_last_number": "yes"}, "verify.fallback_last_number"),
        ({"tolerence": 0.1}, "verify.tolerence"),
    ],
)
def test_numeric_bad_options_name_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(InputError, match=rf"^{field}:") as err:
        NUMERIC.verify("Answer: 1", "1", options)
    assert "\n" not in str(err.value)


def test_numeric_reference_must_be_a_number() -> None:
    with pytest.raises(InputError, match="^answer:"):
        NUMERIC.verify("Answer: 1", "one", {})


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.integers(min_value=-(10**12), max_value=10**12),
        st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False),
    ),
    st.sampled_from(["", "The total is computed.\n", "x = 3 + 4\n"]),
)
def test_numeric_accepts_its_own_reference(x: float, before: str) -> None:
    verdict = NUMERIC.verify(f"{before}Answer: {x}", str(x), {})
    assert verdict.correct, verdict
    assert not NUMERIC.verify(f"{before}Answer: {x}", str(x + 1 + abs(x) * 1e-3), {}).correct


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False))
def test_parse_number_round_trips_repr(x: float) -> None:
    value = parse_number(repr(x))
    assert value is not None and math.isclose(value, x, rel_tol=0, abs_tol=0)


def test_string_normalisation() -> None:
    assert STRING.verify('Answer: "Apple".', "apple", {}).correct
    assert STRING.verify("Answer:   **new   york** ", "New York", {}).correct
    assert not STRING.verify("Answer: apples", "apple", {}).correct
    assert not STRING.verify("Answer: apple", "APPLE", {"case_sensitive": True}).correct
    assert STRING.verify("Answer: `APPLE`", "APPLE", {"case_sensitive": True}).correct
    assert STRING.verify("apple", "apple", {}) == Verdict(False, None, "no answer")


def test_string_falls_back_to_the_answer_is_sentence() -> None:
    assert answer_text('The answer is "boxes". Boxes are nice.') == '"boxes".'
    assert answer_text("so the answer would be: 7\nmore text") == "7"
    assert answer_text("Answer: 3\nthe answer is 4") == "3"  # the Answer: line wins
    assert answer_text("the answer is 4", fallback=False) is None
    assert STRING.verify('The answer is "Boxes".', "boxes", {}) == Verdict(True, '"Boxes".', "ok")
    assert STRING.verify("The answer is boxes.", "boxes", {"fallback_answer_is": False}).reason == "no answer"
    assert REGEX.verify(
        "I think the answer is Banana.", "", {"pattern": "b[a-z]+", "ignore_case": True}
    ).correct


def test_string_ordered_list() -> None:
    opts = {"ordered_list": True}
    assert STRING.verify("Answer: [1, 2, 3, 10]", "1, 2, 3, 10", opts).correct
    assert STRING.verify("Answer: 1 2 3 10.", "1, 2, 3, 10", opts).correct
    assert not STRING.verify("Answer: 1, 2, 10, 3", "1, 2, 3, 10", opts).correct
    assert not STRING.verify("Answer: 1, 2, 3", "1, 2, 3, 10", opts).correct


def test_regex_fullmatch_and_search() -> None:
    opts = {"pattern": r"b[a-z]+", "ignore_case": True}
    assert REGEX.verify("Answer: Banana.", "", opts) == Verdict(True, "Banana", "ok")
    assert not REGEX.verify("Answer: a banana", "", opts).correct
    assert REGEX.verify("no marker", "", opts).reason == "no answer"
    assert REGEX.verify("I pick 42 here", "", {"pattern": r"\b42\b", "search": True}).correct
    assert not REGEX.verify("I pick 420 here", "", {"pattern": r"\b42\b", "search": True}).correct


def test_regex_bad_or_missing_pattern_names_the_field() -> None:
    with pytest.raises(InputError, match=r"^verify.pattern: bad regular expression"):
        REGEX.verify("Answer: x", "", {"pattern": "(unclosed"})
    with pytest.raises(InputError, match=r"^verify.pattern:"):
        REGEX.verify("Answer: x", "", {})


def test_unknown_verifier_is_one_line_naming_the_field() -> None:
    with pytest.raises(InputError) as err:
        get_verifier("judge", "prompts.jsonl:3: verifier")
    assert str(err.value) == (
        "prompts.jsonl:3: verifier: unknown verifier 'judge' (known: numeric, string, regex, program)"
    )
    assert {get_verifier(n, "x").name for n in VERIFIER_NAMES} == set(VERIFIER_NAMES)


def test_extract_code_prefers_the_python_block_defining_the_entry_point() -> None:
    response = (
        "Here:\n```\nprint('not me')\n```\n```python\ndef helper():\n    pass\n```\n"
        "```python\ndef add(a, b):\n    return a + b\n```\nAnswer: add"
    )
    assert extract_code(response, "add") == "def add(a, b):\n    return a + b\n"
    assert extract_code(response) == "def helper():\n    pass\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # unclosed fence
    assert extract_code("def f():\n    return 1\nAnswer: f") == "def f():\n    return 1"


class _Result:
    def __init__(self, ok: bool, stdout: str, reason: str) -> None:
        self.ok, self.stdout, self.reason = ok, stdout, reason
        self.returncode, self.stderr = (0 if ok else 1), ""


def test_program_verifier_runs_code_then_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without executing anything: what reaches the sandbox, and how its result becomes a verdict."""
    calls: list[tuple[str, bool]] = []

    def fake_run(code: str, *, allow_unisolated: bool = False, **_: Any) -> _Result:
        calls.append((code, allow_unisolated))
        marker = code.rstrip().splitlines()[-1].removeprefix("print(").removesuffix(")").strip("'")
        return _Result(True, marker + "\n", "ok")

    sandbox = types.ModuleType("distill.reasoning.sandbox")  # stands in whether or not sandbox.py exists
    monkeypatch.setitem(sys.modules, "distill.reasoning.sandbox", sandbox)
    monkeypatch.setattr(sandbox, "run_python", fake_run, raising=False)
    program = get_verifier("program", "task.verifier", allow_unisolated=True)
    opts = {"entry_point": "add", "tests": "assert add(1, 2) == 3"}
    verdict = program.verify("```python\ndef add(a, b):\n    return a + b\n```\nAnswer: add", "", opts)
    assert verdict == Verdict(True, "def add(a, b):\n    return a + b\n", "ok")
    code, unisolated = calls[0]
    assert unisolated is True
    assert code.index("def add") < code.index("assert add(1, 2) == 3") < code.index("print(")

    monkeypatch.setattr(sandbox, "run_python", lambda code, **_: _Result(True, "", "ok"))
    assert program.verify("import sys; sys.exit(0)", "", opts) == Verdict(
        False, "import sys; sys.exit(0)", "tests not reached"
    )
    monkeypatch.setattr(sandbox, "run_python", lambda code, **_: _Result(False, "", "timeout"))
    assert program.verify("while True: pass", "", opts).reason == "timeout"


def test_program_verifier_needs_tests() -> None:
    program = get_verifier("program", "task.verifier")
    with pytest.raises(InputError, match=r"^verify.tests:"):
        program.verify("def f(): pass", "", {"entry_point": "f"})
    with pytest.raises(InputError, match=r"^verify.entry: unknown option"):
        program.verify("def f(): pass", "", {"tests": "assert f() is None", "entry": "f"})


def _isolated_sandbox() -> Any:
    sandbox = pytest.importorskip("distill.reasoning.sandbox", reason="sandbox.py not written yet")
    if sandbox.isolation() is None:
        pytest.skip("this machine offers no sandbox isolation")
    return sandbox


def test_program_verifier_executes_in_the_sandbox() -> None:
    _isolated_sandbox()
    program = get_verifier("program", "task.verifier")
    opts = {"entry_point": "add", "tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0"}
    right = program.verify("```python\ndef add(a, b):\n    return a + b\n```\nAnswer: add", "", opts)
    assert right.correct and right.reason == "ok"
    wrong = program.verify("```python\ndef add(a, b):\n    return a - b\n```\nAnswer: add", "", opts)
    assert not wrong.correct and wrong.reason != "ok"
    early_exit = program.verify("```python\nimport os\nos._exit(0)\n```", "", opts)
    assert not early_exit.correct


def test_module_exports_the_protocol() -> None:
    assert isinstance(NUMERIC, verifiers.NumericVerifier)
    assert VERIFIER_NAMES == ("numeric", "string", "regex", "program")
