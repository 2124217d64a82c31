"""Verifiers: decide whether a model's response to a task is right, without a judge model.

Every task prompt asks the response to end with a line `Answer: <answer>`; the verifiers read the text
after the last such marker (case-insensitive) and compare it with the reference: as a number (`numeric`),
as normalised text (`string`), against a regular expression (`regex`), or, for code, by running the task's
assert-tests on the response's program in the sandbox (`program`). A verdict carries what was read and a
short reason, so the data factory can report why samples were rejected.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

from distill.errors import InputError


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None  # the answer read from the response (None: none found)
    reason: str  # "ok", "wrong", "no answer", "not a number", "timeout", "memory", ... (short)


class Verifier(Protocol):
    name: str

    def verify(self, response: str, answer: str, options: dict[str, Any]) -> Verdict: ...


# `Answer:` as a word, tolerating markdown emphasis around it ("**Answer:** 12", "Answer**: 12").
_MARKER = re.compile(r"\banswer\W{0,3}?:", re.IGNORECASE)
# Integers with optional thousands commas, decimals, exponents, signs (ASCII or Unicode minus), fractions.
_NUMBER = re.compile(
    r"(?<![\d.])[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+|(?=\.\d))(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?(?!\d)"
)
_EDGE = " \t\r\n\"'`*_.,;:!?()[]{}<>\u201c\u201d\u2018\u2019"


def split_rationale(response: str) -> tuple[str, str | None]:
    """(the reasoning before the final `Answer:` marker, the answer text after it), or (response, None)
    when there is no marker. The answer is the rest of the marker's line, or the next non-empty line when
    the marker ends its line; emphasis marks around it are dropped."""
    found = list(_MARKER.finditer(response))
    if not found:
        return response.strip(), None
    last = found[-1]
    rationale = response[: last.start()].rstrip(" \t*#>-").strip()
    rest = response[last.end() :]
    lines = [line.strip().strip("*").strip() for line in rest.splitlines()]
    answer = next((line for line in lines if line), "")
    return rationale, answer


# The phrasing small models use instead of the `Answer:` line: "The answer is \"boxes\"."
_SAID = re.compile(r"\banswer\s+(?:is|would\s+be|will\s+be)\b\s*:?", re.IGNORECASE)


def answer_text(response: str, fallback: bool = True) -> str | None:
    """The text after the final `Answer:`; with `fallback`, when there is none, the rest of the sentence
    after the last "answer is" (None when neither is there)."""
    _, line = split_rationale(response)
    if line is not None or not fallback:
        return line
    found = list(_SAID.finditer(response))
    if not found:
        return None
    sentence = re.split(r"(?<=[.!?])\s", response[found[-1].end() :].strip().split("\n", 1)[0], maxsplit=1)[0]
    return sentence.strip() or None


def _check_options(options: dict[str, Any], known: tuple[str, ...], verifier: str) -> None:
    for key in options:
        if key not in known:
            raise InputError(
                f"verify.{key}: unknown option for the {verifier} verifier (known: {', '.join(known)})"
            )


def _flag(options: dict[str, Any], key: str, default: bool) -> bool:
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise InputError(f"verify.{key}: must be true or false, got {value!r}")
    return value


def _float_option(options: dict[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise InputError(f"verify.{key}: must be a non-negative number, got {value!r}")
    return float(value)


def parse_number(text: str) -> float | None:
    """The value of one number as written ("1,234", "-3.5", "\u22122", "3/4", ".5"); None if it is not one."""
    body = text.strip().replace("\u2212", "-").replace(",", "")
    try:
        if "/" in body:
            num, den = (part.strip() for part in body.split("/", 1))
            if float(den) == 0:
                return None
            return float(Fraction(num) / Fraction(den))
        value = float(body)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def find_numbers(text: str) -> list[str]:
    """Every number written in `text`, in order, as written."""
    return [m.group(0).strip() for m in _NUMBER.finditer(text) if m.group(0).strip() not in ("", "+", "-")]


class NumericVerifier:
    """The number after the last `Answer:` (the part after a final `=` if the line is an equation, e.g.
    "3 * 60 = 180"), or with `fallback_last_number` (default) the last number anywhere when there is no
    `Answer:`; right when within `tolerance` (absolute) or `rel_tolerance` (relative) of the reference."""

    name = "numeric"
    options = ("tolerance", "rel_tolerance", "fallback_last_number")

    def verify(self, response: str, answer: str, options: dict[str, Any]) -> Verdict:
        _check_options(options, self.options, self.name)
        tolerance = _float_option(options, "tolerance", 1e-6)
        rel_tolerance = _float_option(options, "rel_tolerance", 0.0)
        fallback = _flag(options, "fallback_last_number", True)
        reference = parse_number(answer)
        if reference is None:
            raise InputError(f"answer: the numeric verifier needs a number as the reference, got {answer!r}")
        _, line = split_rationale(response)
        if line is None:
            numbers = find_numbers(response) if fallback else []
            if not numbers:
                return Verdict(False, None, "no answer")
            written = numbers[-1]
        else:
            numbers = find_numbers(line.rsplit("=", 1)[-1]) or find_numbers(line)
            if not numbers:
                return Verdict(False, line, "not a number")
            written = numbers[0]
        value = parse_number(written)
        if value is None:
            return Verdict(False, written, "not a number")
        close = abs(value - reference) <= max(tolerance, rel_tolerance * abs(reference))
        return Verdict(close, written, "ok" if close else "wrong")


def normalise_text(text: str, *, case_sensitive: bool = False) -> str:
    """Surrounding quotes, emphasis and punctuation dropped, whitespace collapsed, case folded (unless
    `case_sensitive`)."""
    text = " ".join(text.split()).strip(_EDGE)
    return text if case_sensitive else text.casefold()


def _items(text: str, case_sensitive: bool) -> list[str]:
    parts = re.split(r"[,;\s]+", normalise_text(text, case_sensitive=case_sensitive))
    return [p for p in (normalise_text(q, case_sensitive=case_sensitive) for q in parts) if p]


class StringVerifier:
    """Exact match of the normalised answer text (see `normalise_text`); with `ordered_list`, of the lists
    of items split on commas, semicolons and spaces ("1, 2, 3" == "1 2 3"). `case_sensitive` for tasks whose
    point is the case (e.g. "write it in capitals"). With `fallback_answer_is` (default) a response without
    the `Answer:` line is read at its last "the answer is ..." (see `answer_text`)."""

    name = "string"
    options = ("ordered_list", "case_sensitive", "fallback_answer_is")

    def verify(self, response: str, answer: str, options: dict[str, Any]) -> Verdict:
        _check_options(options, self.options, self.name)
        ordered = _flag(options, "ordered_list", False)
        case_sensitive = _flag(options, "case_sensitive", False)
        line = answer_text(response, _flag(options, "fallback_answer_is", True))
        if line is None:
            return Verdict(False, None, "no answer")
        if ordered:
            same = _items(line, case_sensitive) == _items(answer, case_sensitive)
        else:
            same = normalise_text(line, case_sensitive=case_sensitive) == normalise_text(
                answer, case_sensitive=case_sensitive
            )
        return Verdict(same, line, "ok" if same else "wrong")


class RegexVerifier:
    """For answers with many right forms: the answer text (edges normalised, case kept) must fully match
    `pattern`, or with `search` the pattern must occur anywhere in the response. `ignore_case` as named;
    `fallback_answer_is` as for `string`."""

    name = "regex"
    options = ("pattern", "search", "ignore_case", "fallback_answer_is")

    def verify(self, response: str, answer: str, options: dict[str, Any]) -> Verdict:
        _check_options(options, self.options, self.name)
        pattern = options.get("pattern")
        if not isinstance(pattern, str):
            raise InputError(f"verify.pattern: the regex verifier needs a pattern string, got {pattern!r}")
        flags = re.IGNORECASE if _flag(options, "ignore_case", False) else 0
        try:
            compiled = re.compile(pattern, flags)
        except re.error as err:
            raise InputError(f"verify.pattern: bad regular expression {pattern!r}: {err}") from None
        if _flag(options, "search", False):
            found = compiled.search(response)
            return Verdict(found is not None, found.group(0) if found else None, "ok" if found else "wrong")
        line = answer_text(response, _flag(options, "fallback_answer_is", True))
        if line is None:
            return Verdict(False, None, "no answer")
        text = normalise_text(line, case_sensitive=True)
        ok = compiled.fullmatch(text) is not None
        return Verdict(ok, text, "ok" if ok else "wrong")


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(response: str, entry_point: str | None = None) -> str:
    """The program in a response: a ```python block (the one defining `entry_point` when several), else
    any ``` block, else the whole response without its `Answer:` line."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(response)]
    python = [code for lang, code in blocks if lang in ("python", "py", "python3")]
    for group in (python, [code for _, code in blocks]):
        if entry_point is not None:
            defining = [c for c in group if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", c)]
            if defining:
                return defining[0]
        if group:
            return group[0]
    return "\n".join(line for line in response.splitlines() if not _MARKER.match(line.strip()))


class ProgramVerifier:
    """Runs the response's program followed by the task's assert-`tests` in the sandbox: right iff the
    run exits cleanly within the limits and reaches the end of the tests (a marker printed after them, so
    a program that calls `exit(0)` early does not pass)."""

    name = "program"
    options = ("tests", "entry_point", "reference")

    def __init__(self, allow_unisolated: bool = False, limits: Any = None) -> None:
        self.allow_unisolated = allow_unisolated
        self.limits = limits  # a sandbox.Limits; None: the sandbox's defaults (set by the factory's recipe)

    def verify(self, response: str, answer: str, options: dict[str, Any]) -> Verdict:
        _check_options(options, self.options, self.name)
        tests = options.get("tests")
        if not isinstance(tests, str) or not tests.strip():
            raise InputError("verify.tests: the program verifier needs assert-tests (a non-empty string)")
        entry_point = options.get("entry_point")
        if entry_point is not None and not isinstance(entry_point, str):
            raise InputError(f"verify.entry_point: must be a function name, got {entry_point!r}")
        from distill.reasoning.sandbox import run_python  # written beside this module; imported on use

        code = extract_code(response, entry_point)
        done = f"tests-passed-{secrets.token_hex(8)}"
        program = f"{code}\n\n{tests}\n\nprint({done!r})\n"
        if self.limits is not None:
            result = run_python(program, limits=self.limits, allow_unisolated=self.allow_unisolated)
        else:
            result = run_python(program, allow_unisolated=self.allow_unisolated)
        if result.ok and done not in result.stdout:
            return Verdict(False, code, "tests not reached")
        return Verdict(result.ok, code, result.reason)


VERIFIER_NAMES: tuple[str, ...] = ("numeric", "string", "regex", "program")


def get_verifier(name: str, where: str, *, allow_unisolated: bool = False) -> Verifier:
    """The verifier called `name`; `where` names the field it came from, for the error."""
    if name == "numeric":
        return NumericVerifier()
    if name == "string":
        return StringVerifier()
    if name == "regex":
        return RegexVerifier()
    if name == "program":
        return ProgramVerifier(allow_unisolated)
    raise InputError(f"{where}: unknown verifier {name!r} (known: {', '.join(VERIFIER_NAMES)})")
