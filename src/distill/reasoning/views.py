"""The training sets a factory run offers, written into its folder and read back as Examples: the kept
(verified, deduplicated, filtered) samples; every generated sample unfiltered (the baseline that shows
what verification buys); the shortest kept trace per prompt (chain-of-thought compression); correct vs
incorrect pairs (preference methods); the held-out prompts with their references (evaluation)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.data.records import Example, read_jsonl
from distill.io import write_jsonl_atomic
from distill.reasoning.dedup import normalise
from distill.reasoning.factory_prompts import PromptRow
from distill.reasoning.selection import KEPT, STAGES

KEPT_FILE, UNFILTERED_FILE, PAIRS_FILE, HELDOUT_FILE = (
    "kept.jsonl",
    "unfiltered.jsonl",
    "pairs.jsonl",
    "heldout.jsonl",
)


@dataclass
class FactoryOutput:
    folder: Path
    manifest: dict[str, Any]


def _folder(source: FactoryOutput | Path | str) -> Path:
    return source.folder if isinstance(source, FactoryOutput) else Path(source)


def sample_row(prompt: PromptRow, sample: dict[str, Any]) -> dict[str, Any]:
    """A prompt/completion row (read_examples reads it; the rest goes to meta)."""
    return {
        "prompt": prompt.prompt,
        "completion": sample["text"],
        "finished": sample["finished"],
        **{k: v for k, v in prompt.row().items() if k != "prompt"},
        "index": sample["index"],
        "sample": sample["sample"],
    }


def make_pairs(
    prompts: list[PromptRow], verified: list[dict[str, Any]], status: list[str], max_pairs: int
) -> list[dict[str, Any]]:
    """Per prompt, kept samples (chosen, in sample order) against distinct incorrect ones (rejected,
    finished first): pair k is (chosen[k mod c], rejected[k mod r]) for k < min(max_pairs, max(c, r)), so
    every sample on the shorter side and no pair repeats."""
    chosen: dict[int, list[dict[str, Any]]] = {}
    rejected: dict[int, list[dict[str, Any]]] = {}
    for row, s in zip(verified, status, strict=True):
        if s == KEPT:
            chosen.setdefault(row["index"], []).append(row)
        elif s.startswith("verify:"):
            rejected.setdefault(row["index"], []).append(row)
    out: list[dict[str, Any]] = []
    for index in sorted(chosen):
        good = sorted(chosen[index], key=lambda r: r["sample"])
        bad: list[dict[str, Any]] = []
        seen: set[str] = set()
        for r in sorted(rejected.get(index, []), key=lambda r: (not r["finished"], r["sample"])):
            if normalise(r["text"]) not in seen:
                seen.add(normalise(r["text"]))
                bad.append(r)
        if not bad:
            continue
        for k in range(min(max_pairs, max(len(good), len(bad)))):
            out.append(
                {
                    "prompt": prompts[index].prompt,
                    "chosen": good[k % len(good)]["text"],
                    "rejected": bad[k % len(bad)]["text"],
                    "task": prompts[index].task,
                }
            )
    return out


def write_views(
    folder: Path,
    prompts: list[PromptRow],
    verified: list[dict[str, Any]],
    status: list[str],
    heldout: list[int],
    max_pairs: int,
) -> list[str]:
    """Write kept, unfiltered, pairs and held-out files; returns their names."""
    write_jsonl_atomic(
        folder / KEPT_FILE,
        (sample_row(prompts[r["index"]], r) for r, s in zip(verified, status, strict=True) if s == KEPT),
    )
    write_jsonl_atomic(folder / UNFILTERED_FILE, (sample_row(prompts[r["index"]], r) for r in verified))
    write_jsonl_atomic(folder / PAIRS_FILE, make_pairs(prompts, verified, status, max_pairs))
    write_jsonl_atomic(folder / HELDOUT_FILE, ({**prompts[i].row(), "index": i} for i in heldout))
    return [KEPT_FILE, UNFILTERED_FILE, PAIRS_FILE, HELDOUT_FILE]


def _examples(path: Path) -> list[Example]:
    out: list[Example] = []
    for _, row in read_jsonl(path):
        meta = {k: v for k, v in row.items() if k not in ("prompt", "completion", "finished")}
        prompt = [{"role": "user", "content": row["prompt"]}]
        out.append(
            Example(prompt, row.get("completion"), meta=meta, finished=bool(row.get("finished", True)))
        )
    return out


def verified_examples(source: FactoryOutput | Path | str) -> list[Example]:
    """Prompt + kept completion (verified correct, deduplicated, filtered)."""
    return _examples(_folder(source) / KEPT_FILE)


def unfiltered_examples(source: FactoryOutput | Path | str) -> list[Example]:
    """Every generated training sample, right or wrong, cut or not: the unfiltered-SFT baseline."""
    return _examples(_folder(source) / UNFILTERED_FILE)


def shortest_examples(source: FactoryOutput | Path | str) -> list[Example]:
    """Per prompt the shortest kept trace (ties: the lower sample index), in prompt order."""
    best: dict[int, Example] = {}
    for ex in verified_examples(source):
        index = ex.meta["index"]
        held = best.get(index)
        if held is None or len(ex.completion or "") < len(held.completion or ""):
            best[index] = ex
    return [best[i] for i in sorted(best)]


def pair_examples(source: FactoryOutput | Path | str) -> list[tuple[Example, Example]]:
    """(chosen, rejected) per pair row: the same prompt, a verified-correct kept answer and a wrong one."""
    out: list[tuple[Example, Example]] = []
    for _, row in read_jsonl(_folder(source) / PAIRS_FILE):
        prompt = [{"role": "user", "content": row["prompt"]}]
        meta = {"task": row["task"]}
        out.append(
            (Example(prompt, row["chosen"], dict(meta)), Example(list(prompt), row["rejected"], dict(meta)))
        )
    return out


def heldout_examples(source: FactoryOutput | Path | str) -> list[Example]:
    """The held-out prompts (completion None) with answer, task, verifier and options in meta."""
    return _examples(_folder(source) / HELDOUT_FILE)


def funnel_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for a report table: one per task, then the total."""
    counts = manifest["funnel"]
    rows = [{"task": task, **{s: c[s] for s in STAGES}} for task, c in counts["tasks"].items()]
    return [*rows, {"task": "total", **{s: counts["total"][s] for s in STAGES}}]
