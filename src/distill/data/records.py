"""Read prompt/completion or chat-`messages` records from JSONL, Parquet or a saved `datasets` folder,
and write JSONL atomically."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import InputError
from distill.paths import resolve_path


@dataclass
class Example:
    """One conversation: the messages before the answer, and the answer (None when only prompts are given)."""

    prompt: list[dict[str, str]]
    completion: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    finished: bool = True  # False when a generated answer was cut at max_new_tokens: no end token is learnt


def _to_example(row: dict[str, Any], where: str) -> Example:
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        msgs = [{"role": str(m.get("role", "")), "content": str(m.get("content", ""))} for m in msgs]
        if msgs[-1]["role"] == "assistant":
            return Example(msgs[:-1], msgs[-1]["content"], finished=bool(row.get("finished", True)))
        return Example(prompt=msgs, completion=None)
    if "prompt" in row:
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise InputError(f"{where}: 'prompt' must be a string")
        completion = row.get("completion")
        if completion is not None and not isinstance(completion, str):
            raise InputError(f"{where}: 'completion' must be a string")
        meta = {k: v for k, v in row.items() if k not in ("prompt", "completion", "finished")}
        finished = bool(row.get("finished", True))
        return Example([{"role": "user", "content": prompt}], completion, meta=meta, finished=finished)
    raise InputError(f"{where}: a record needs 'prompt' (and 'completion') or 'messages'")


def read_examples(path_str: str, limit: int | None = None) -> list[Example]:
    """Load examples; errors name the file (and the line for JSONL)."""
    path = resolve_path(path_str)
    if not path.exists():
        raise InputError(f"data file not found: {path}")
    rows: Iterable[tuple[str, dict[str, Any]]]
    if path.is_dir():
        rows = _read_datasets_folder(path)
    elif path.suffix == ".parquet":
        rows = _read_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        rows = read_jsonl(path)
    else:
        raise InputError(f"{path}: unknown data format (use .jsonl, .parquet or a datasets folder)")
    out: list[Example] = []
    for where, row in rows:
        out.append(_to_example(row, where))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise InputError(f"{path}: no records")
    return out


def read_jsonl(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path} line {lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path} line {lineno}: each line must be a JSON object")
            yield f"{path} line {lineno}", row


def _read_parquet(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for bad files
        raise InputError(f"{path}: cannot read Parquet ({str(err).splitlines()[0]})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", row


def _read_datasets_folder(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError or its own errors
        raise InputError(f"{path}: not a saved datasets folder ({str(err).splitlines()[0]})") from None
    if hasattr(ds, "keys"):  # a DatasetDict: take the train split
        ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
    for i, row in enumerate(ds):
        yield f"{path} row {i}", dict(row)
