"""Verifiable task generators: prompts whose answers a program can check, made from a seed.

Four families, each sized so the project's small teacher (SmolLM2-135M-Instruct) is right on some but not
all items - the data factory needs both kept and rejected samples (measured: docs/benchmarks/
reasoning_tasks.md). Items come from `random.Random` seeded by (family, seed), never global state, so a
factory run can be repeated or resumed exactly. Every prompt ends with the answer-format instruction the
verifiers read: a final line `Answer: <answer>`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distill.errors import InputError


@dataclass(frozen=True)
class TaskItem:
    task: str  # task family name, e.g. "arithmetic"
    prompt: str  # the user message, ending with the answer-format instruction
    answer: str  # reference answer (a number as text, a normalised string, or for "program": "")
    verifier: str  # "numeric" | "string" | "regex" | "program"
    options: dict[str, Any]  # verifier options


FINISH = "Finish with a line `Answer: <answer>`."
_NAMES = ("Tom", "Anna", "Sam", "Mia", "Ben", "Lily", "Max", "Emma", "Leo", "Zoe")
_THINGS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "stamps")
_WORDS = (
    "cat", "dog", "sun", "pen", "cup", "map", "box", "hat", "red", "bag",
    "tree", "fish", "bird", "lamp", "book", "milk", "frog", "star", "cake", "door",
    "apple", "table", "house", "water", "green", "chair", "bread", "music",
)  # fmt: skip


def _number(value: float) -> str:
    """A reference number as text: integers without a decimal point, others without float noise."""
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def _arithmetic(rng: random.Random) -> TaskItem:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    kind = rng.choice(("add", "sub", "mul"))
    if kind == "add":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        question, value = (
            f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?",
            a + b,
        )
    elif kind == "sub":
        a = rng.randint(6, 15)
        b = rng.randint(2, a - 2)
        question, value = f"{name} has {a} {thing} and gives {b} away. How many {thing} are left?", a - b
    else:
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        question = f"{name} has {a} boxes with {b} {thing} in each box. How many {thing} are there in all?"
        value = a * b
    return TaskItem("arithmetic", f"{question}\n{FINISH}", _number(value), "numeric", {"tolerance": 1e-6})


# (from, to, how many `to` make one `from`): the factor is stated in the prompt, so the task is reading it
# and multiplying, not recalling it (the 135M teacher mostly misremembers factors: measured 10 %).
_CONVERSIONS = (
    ("week", "weeks", "days", 7),
    ("centimeter", "centimeters", "millimeters", 10),
    ("dozen", "dozens", "eggs", 12),
    ("day", "days", "hours", 24),
    ("hour", "hours", "minutes", 60),
    ("meter", "meters", "centimeters", 100),
    ("kilogram", "kilograms", "grams", 1000),
)


def _units(rng: random.Random) -> TaskItem:
    one, many, dst, factor = rng.choice(_CONVERSIONS)
    amount = rng.randint(2, 5)
    prompt = f"One {one} is {factor} {dst}. How many {dst} are in {amount} {many}?\n{FINISH}"
    return TaskItem(
        "units", prompt, _number(amount * factor), "numeric", {"tolerance": 1e-6, "rel_tolerance": 1e-3}
    )


_PLURALS = (
    ("cat", "cats"), ("dog", "dogs"), ("box", "boxes"), ("hat", "hats"), ("tree", "trees"), ("bird", "birds"),
    ("lamp", "lamps"), ("book", "books"), ("star", "stars"), ("car", "cars"), ("ball", "balls"),
    ("bus", "buses"), ("dish", "dishes"), ("fox", "foxes"), ("house", "houses"), ("apple", "apples"),
)  # fmt: skip
_COMPOUNDS = (
    ("sun", "flower"), ("rain", "bow"), ("foot", "ball"), ("book", "shelf"), ("tooth", "brush"),
    ("snow", "man"), ("cup", "cake"), ("fire", "fly"), ("star", "fish"), ("bed", "room"), ("air", "plane"),
    ("butter", "fly"), ("sea", "shell"), ("pan", "cake"), ("rain", "coat"), ("sun", "light"),
)  # fmt: skip


def _strings(rng: random.Random) -> TaskItem:
    """Word and list transformations within the small teacher's reach. Letter-level ones (reversing,
    capitalising, counting letters, first/last letter) and sorting it solved 0/8 each when tried, so they
    are left out: a family it never solves gives the factory nothing to keep."""
    kind = rng.choice(("plural", "join", "count"))
    if kind == "plural":
        word, plural = rng.choice(_PLURALS)
        prompt = f'What is the plural of the word "{word}"?\n{FINISH}'
        return TaskItem("strings", prompt, plural, "string", {})
    if kind == "join":
        first, second = rng.choice(_COMPOUNDS)
        prompt = f'Join the words "{first}" and "{second}" into one word.\n{FINISH}'
        return TaskItem("strings", prompt, first + second, "string", {})
    words = rng.sample(_WORDS, rng.randint(2, 4))
    prompt = f"How many words are in this list: {', '.join(words)}?\n{FINISH}"
    pattern = rf"{len(words)}(\s+words?)?"
    return TaskItem("strings", prompt, str(len(words)), "regex", {"pattern": pattern, "ignore_case": True})


# (entry point, signature, what it does, reference body, test inputs builder)
_Program = tuple[str, str, str, str, Callable[[random.Random], list[tuple[str, str]]]]


def _int_pairs(op: Callable[[int, int], int]) -> Callable[[random.Random], list[tuple[str, str]]]:
    def cases(rng: random.Random) -> list[tuple[str, str]]:
        pairs = [(rng.randint(-20, 20), rng.randint(-20, 20)) for _ in range(3)]
        return [(f"{a}, {b}", repr(op(a, b))) for a, b in pairs]

    return cases


def _word_cases(fn: Callable[[str], Any]) -> Callable[[random.Random], list[tuple[str, str]]]:
    def cases(rng: random.Random) -> list[tuple[str, str]]:
        return [(repr(w), repr(fn(w))) for w in rng.sample(_WORDS, 3)]

    return cases


def _list_cases(fn: Callable[[list[int]], Any]) -> Callable[[random.Random], list[tuple[str, str]]]:
    def cases(rng: random.Random) -> list[tuple[str, str]]:
        lists = [[rng.randint(-9, 30) for _ in range(rng.randint(2, 5))] for _ in range(3)]
        return [(repr(xs), repr(fn(xs))) for xs in lists]

    return cases


def _palindrome_cases(rng: random.Random) -> list[tuple[str, str]]:
    words = [rng.choice(("level", "noon", "racecar", "kayak", "refer")), *rng.sample(_WORDS, 2)]
    return [(repr(w), repr(w == w[::-1])) for w in words]


def _fizz(n: int) -> str:
    return "FizzBuzz" if n % 15 == 0 else "Fizz" if n % 3 == 0 else "Buzz" if n % 5 == 0 else str(n)


def _fizz_cases(rng: random.Random) -> list[tuple[str, str]]:
    picks = [
        rng.choice((3, 6, 9, 12)),
        rng.choice((5, 10, 20)),
        15 * rng.randint(1, 4),
        rng.choice((1, 2, 7, 11)),
    ]
    return [(str(n), repr(_fizz(n))) for n in picks]


def _number_cases(fn: Callable[[int], Any]) -> Callable[[random.Random], list[tuple[str, str]]]:
    def cases(rng: random.Random) -> list[tuple[str, str]]:
        return [(str(n), repr(fn(n))) for n in rng.sample(range(0, 9), 3)]

    return cases


def _second_largest(xs: list[int]) -> int:
    return sorted(set(xs))[-2]


def _distinct_lists(fn: Callable[[list[int]], Any]) -> Callable[[random.Random], list[tuple[str, str]]]:
    def cases(rng: random.Random) -> list[tuple[str, str]]:
        return [
            (repr(xs), repr(fn(xs)))
            for xs in (rng.sample(range(-9, 30), rng.randint(3, 5)) for _ in range(3))
        ]

    return cases


# One easy function per four harder ones: the teacher writes one-liners like `max(numbers)` almost always
# (measured 32/32), so most items need a loop or a condition.
_PROGRAMS: tuple[_Program, ...] = (
    ("largest", "largest(numbers)", "returns the largest number in the list numbers", "return max(numbers)", _list_cases(max)),
    ("reverse_string", "reverse_string(s)", "returns the string s reversed", "return s[::-1]", _word_cases(lambda w: w[::-1])),
    ("count_vowels", "count_vowels(s)", "returns how many vowels (a, e, i, o, u) the lower-case string s has", "return sum(c in 'aeiou' for c in s)", _word_cases(lambda w: sum(c in "aeiou" for c in w))),
    ("count_even", "count_even(numbers)", "returns how many even numbers the list numbers has", "return sum(n % 2 == 0 for n in numbers)", _list_cases(lambda xs: sum(n % 2 == 0 for n in xs))),
    ("factorial", "factorial(n)", "returns n factorial (1 for n = 0)", "return 1 if n == 0 else n * factorial(n - 1)", _number_cases(math.factorial)),
    ("second_largest", "second_largest(numbers)", "returns the second largest number in a list of distinct numbers", "return sorted(numbers)[-2]", _distinct_lists(_second_largest)),
    ("sum_of_squares", "sum_of_squares(numbers)", "returns the sum of the squares of the numbers in the list", "return sum(n * n for n in numbers)", _list_cases(lambda xs: sum(n * n for n in xs))),
    ("positives", "positives(numbers)", "returns a list of the numbers in the list that are greater than 0, in order", "return [n for n in numbers if n > 0]", _list_cases(lambda xs: [n for n in xs if n > 0])),
    ("is_palindrome", "is_palindrome(s)", "returns True if the string s reads the same backwards, else False", "return s == s[::-1]", _palindrome_cases),
    ("fizz", "fizz(n)", "returns 'Fizz' if n is divisible by 3, 'Buzz' if by 5, 'FizzBuzz' if by both, else str(n)", "return 'FizzBuzz' if n % 15 == 0 else 'Fizz' if n % 3 == 0 else 'Buzz' if n % 5 == 0 else str(n)", _fizz_cases),
)  # fmt: skip


def _programs(rng: random.Random) -> TaskItem:
    name, signature, does, body, cases = rng.choice(_PROGRAMS)
    tests = "\n".join(f"assert {name}({args}) == {expected}" for args, expected in cases(rng))
    prompt = (
        f"Write a Python function `{signature}` that {does}.\n"
        f"Give the function in a ```python code block, then finish with a line `Answer: {name}`."
    )
    options = {"entry_point": name, "tests": tests, "reference": f"def {signature}:\n    {body}\n"}
    return TaskItem("programs", prompt, "", "program", options)


_GENERATORS: dict[str, Callable[[random.Random], TaskItem]] = {
    "arithmetic": _arithmetic,
    "units": _units,
    "strings": _strings,
    "programs": _programs,
}
TASK_NAMES: tuple[str, ...] = tuple(_GENERATORS)


def make_tasks(task: str, count: int, seed: int) -> list[TaskItem]:
    """`count` items of family `task`, the same for the same (task, count, seed); a longer list starts
    with the shorter one. Distinct prompts while the family has them to give."""
    make = _GENERATORS.get(task)
    if make is None:
        raise InputError(f"factory.tasks: unknown task {task!r} (known: {', '.join(TASK_NAMES)})")
    if count < 0:
        raise InputError(f"factory.tasks: count must be >= 0, got {count}")
    rng = random.Random(f"distill-task:{task}:{seed}")
    items: list[TaskItem] = []
    seen: set[str] = set()
    for _ in range(count):
        item = make(rng)
        for _retry in range(50):  # small families run out of new prompts: then repeats are allowed
            if item.prompt not in seen:
                break
            item = make(rng)
        seen.add(item.prompt)
        items.append(item)
    return items


def task_row(item: TaskItem) -> dict[str, Any]:
    """The item as a prompt-file row (`distill.data.records.read_examples` reads it; the rest is meta)."""
    return {
        "prompt": item.prompt,
        "answer": item.answer,
        "task": item.task,
        "verifier": item.verifier,
        "verify": dict(item.options),
    }
