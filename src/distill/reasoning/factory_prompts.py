"""The data factory's inputs: task rows from a prompt file or the task generators, checked before any
generation (every row names a known verifier whose options fit), the seeded held-out split, and the
fingerprint of everything that makes the data."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

from distill.configs.factory import FactoryConfig
from distill.data.records import read_jsonl
from distill.errors import InputError
from distill.paths import resolve_path
from distill.reasoning.dedup import normalise
from distill.reasoning.verifiers import Verifier, get_verifier


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    answer: str
    task: str
    verifier: str
    options: dict[str, Any]
    where: str  # "<file> line <n>" or "factory.tasks[<i>] item <k>", for errors

    def row(self) -> dict[str, Any]:
        """As a prompt-file row (read_examples reads it; answer, task, verifier and verify go to meta)."""
        return {
            "prompt": self.prompt,
            "answer": self.answer,
            "task": self.task,
            "verifier": self.verifier,
            "verify": self.options,
        }


def _from_file_row(row: dict[str, Any], where: str) -> PromptRow:
    for key in ("prompt", "answer", "verifier"):
        if key not in row:
            raise InputError(
                f"{where}: a factory prompt row needs '{key}' (keys: prompt, answer, task, verifier)"
            )
    prompt, answer, verifier = row["prompt"], row["answer"], row["verifier"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}: 'prompt' must be a non-empty string")
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise InputError(f"{where}: 'answer' must be a string or a number")
    if not isinstance(verifier, str):
        raise InputError(f"{where}: 'verifier' must be a verifier name")
    task = row.get("task", "default")
    if not isinstance(task, str) or not task:
        raise InputError(f"{where}: 'task' must be a non-empty string")
    options = row.get("verify", {})
    if not isinstance(options, dict):
        raise InputError(f"{where}: 'verify' must be an object of verifier options")
    return PromptRow(prompt, str(answer), task, verifier, options, where)


def load_prompts(cfg: FactoryConfig, seed: int) -> list[PromptRow]:
    """The task rows, in file order or task by task; errors name the file and line (or the task)."""
    if cfg.tasks is not None:
        from distill.reasoning.tasks import make_tasks

        rows: list[PromptRow] = []
        for t, spec in enumerate(cfg.tasks):
            for k, item in enumerate(make_tasks(spec.name, spec.count, seed=seed)):
                where = f"factory.tasks[{t}] ({spec.name}) item {k}"
                rows.append(
                    PromptRow(item.prompt, item.answer, item.task, item.verifier, dict(item.options), where)
                )
        return rows
    assert cfg.prompts is not None
    path = resolve_path(cfg.prompts)
    if not path.is_file():
        raise InputError(f"factory.prompts: file not found: {path}")
    if path.suffix not in (".jsonl", ".json"):
        raise InputError(f"factory.prompts: {path} must be a JSONL file of task rows")
    rows = [_from_file_row(row, where) for where, row in read_jsonl(path)]
    if not rows:
        raise InputError(f"factory.prompts: {path} holds no prompts")
    return rows


def open_verifiers(rows: list[PromptRow], allow_unisolated: bool) -> dict[str, Verifier]:
    """One verifier per name the rows use, failing on the first row with an unknown name; every row's
    options are tried on an empty response (cheap checks only: program tests are not run), so a bad
    option or reference answer stops the run before any generation."""
    verifiers: dict[str, Verifier] = {}
    for row in rows:
        if row.verifier not in verifiers:
            verifiers[row.verifier] = get_verifier(row.verifier, row.where, allow_unisolated=allow_unisolated)
        if row.verifier != "program":
            verify_row(verifiers[row.verifier], row, "")
    return verifiers


def verify_row(verifier: Verifier, row: PromptRow, response: str) -> Any:
    """The verdict on `response`; a bad option or reference answer names the row it came from."""
    try:
        return verifier.verify(response, row.answer, row.options)
    except InputError as err:
        raise InputError(f"{row.where}: {err}") from None


def make_split(rows: list[PromptRow], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) prompt indices, each sorted. Per task, a seeded `fraction` of the distinct
    prompts (at least one, and never all, when a task has two or more) is held out; identical prompts go
    to the same side, so no held-out prompt is also a training prompt."""
    by_task: dict[str, dict[str, list[int]]] = {}
    for i, row in enumerate(rows):
        by_task.setdefault(row.task, {}).setdefault(normalise(row.prompt), []).append(i)
    heldout: list[int] = []
    for task, groups in by_task.items():
        keys = list(groups)
        k = min(max(round(fraction * len(keys)), 1), len(keys) - 1) if len(keys) >= 2 else 0
        rng = random.Random(f"distill-factory-split:{seed}:{task}")
        for key in rng.sample(keys, k):
            heldout.extend(groups[key])
    held = set(heldout)
    return [i for i in range(len(rows)) if i not in held], sorted(held)


def sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def factory_fingerprint(
    cfg: FactoryConfig, rows: list[PromptRow], teacher: str, seed: int, system_prompt: str | None
) -> str:
    """What makes the samples and their verdicts: the factory's sampling, split, shard and sandbox
    settings (not where it is written, not batch size, not the prompt file's path: its rows count
    instead), the prompts, the teacher, seed, system prompt. Dedup, filters, pairing and the
    contamination n-gram are left out: they are re-applied to the stored samples on every run, so
    changing them reuses the generation instead of refusing the folder."""
    post = {
        "output",
        "batch_size",
        "prompts",
        "dedup",
        "filters",
        "contamination_ngram",
        "max_pairs_per_prompt",
    }
    return sha256_json(
        {
            "factory": cfg.model_dump(exclude=post),
            "prompts": [r.row() for r in rows],
            "teacher": teacher,
            "seed": seed,
            "system_prompt": system_prompt,
        }
    )[:16]
