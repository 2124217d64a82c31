"""The reasoning data factory: generate n teacher samples per training prompt, verify each, deduplicate and
filter; write every stage to one folder, with a manifest that says what made the data and what each stage
let through.

Resumable and exact: the held-out split is made first (split.json) and fixed; generation runs in shards of
`shard_size` training prompts whose samples depend only on (seed, shard index), each shard written
atomically (samples/shard-NNNNN.jsonl) and then verified (verified/shard-NNNNN.jsonl), so a killed run
resumes by skipping the shards on disk - programs are not re-run - and ends with the same files as an
uninterrupted run. A folder made with other settings is never mixed with or overwritten: the run stops with
one line naming `factory.output`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from distill.configs.factory import FactoryConfig
from distill.data.records import read_jsonl
from distill.data.tokenize import prompt_ids
from distill.errors import InputError
from distill.io import write_json_atomic, write_jsonl_atomic
from distill.paths import resolve_path
from distill.progress import NullProgress, Progress
from distill.reasoning.dedup import contamination
from distill.reasoning.factory_prompts import (
    PromptRow,
    factory_fingerprint,
    load_prompts,
    make_split,
    open_verifiers,
    sha256_json,
    verify_row,
)
from distill.reasoning.selection import KEPT, funnel, select_samples
from distill.reasoning.teacher_samples import Sampler
from distill.reasoning.verifiers import Verifier
from distill.reasoning.views import FactoryOutput, write_views

__all__ = ["FactoryOutput", "factory_folder", "run_factory", "shard_seed"]

SPLIT, PROMPTS, VERIFIED, MANIFEST, TIMINGS = (
    "split.json",
    "prompts.jsonl",
    "verified.jsonl",
    "manifest.json",
    "timings.json",
)
HELDOUT_VERIFIED = "heldout_verified.jsonl"
# (kind) -> (samples folder, verified folder)
_SHARD_DIRS = {"train": ("samples", "verified"), "heldout": ("heldout_samples", "heldout_verified")}


def factory_folder(cfg: FactoryConfig, name: str) -> Path:
    return resolve_path(cfg.output.format(name=name))


def shard_seed(seed: int, kind: str, shard: int) -> int:
    """The sampling seed of one shard: a function of (seed, kind, shard index) only, below 2**31."""
    digest = hashlib.sha256(f"distill-factory:{seed}:{kind}:{shard}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_folder(folder: Path, fingerprint: str) -> None:
    """Refuse a folder holding other data: a different fingerprint, or files that are not a factory's."""
    for name in (SPLIT, MANIFEST):
        path = folder / name
        if not path.exists():
            continue
        try:
            old = json.loads(path.read_text(encoding="utf-8"))["fingerprint"]
        except (ValueError, KeyError, TypeError):
            raise InputError(
                f"factory.output: {path} is not a factory file; choose another factory.output"
            ) from None
        if old != fingerprint:
            raise InputError(
                f"factory.output: {folder} holds factory data made with other settings (fingerprint {old}, "
                f"this recipe {fingerprint}); choose another factory.output or remove that folder"
            )
    foreign = folder.is_dir() and not (folder / SPLIT).exists()
    if foreign and any(not child.name.startswith(".") for child in folder.iterdir()):
        raise InputError(f"factory.output: {folder} exists and is not a factory folder; choose another")


def _split(
    folder: Path, prompts: list[PromptRow], cfg: FactoryConfig, seed: int, fp: str
) -> tuple[list[int], list[int]]:
    """The stored split, or a new one, written (then the prompt rows) before anything is generated."""
    path = folder / SPLIT
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        train, heldout = list(stored["train"]), list(stored["heldout"])
    else:
        train, heldout = make_split(prompts, cfg.heldout, seed)
        write_json_atomic(path, _split_record(prompts, cfg, seed, fp, train, heldout))
    if not (folder / PROMPTS).exists():
        write_jsonl_atomic(folder / PROMPTS, ({**p.row(), "index": i} for i, p in enumerate(prompts)))
    return train, heldout


def _split_record(
    prompts: list[PromptRow], cfg: FactoryConfig, seed: int, fp: str, train: list[int], heldout: list[int]
) -> dict[str, Any]:
    return {
        "fingerprint": fp,
        "prompts_sha256": sha256_json([p.row() for p in prompts]),
        "seed": seed,
        "heldout_fraction": cfg.heldout,
        "train": train,
        "heldout": heldout,
    }


class _Timings:
    """Seconds per shard and stage, kept across resumed runs (timings.json; not part of the data)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / TIMINGS
        self.data: dict[str, dict[str, float]] = {"generation_s": {}, "verification_s": {}}
        if self.path.exists():
            self.data.update(json.loads(self.path.read_text(encoding="utf-8")))

    def add(self, stage: str, key: str, seconds: float) -> None:
        self.data[stage][key] = round(seconds, 3)
        write_json_atomic(self.path, self.data)

    def total(self, stage: str) -> float:
        return round(sum(self.data[stage].values()), 3)


class _Shards:
    """Generation and verification of the prompts of one kind (training or held-out), shard by shard."""

    def __init__(
        self,
        folder: Path,
        prompts: list[PromptRow],
        sampler: Sampler,
        tokenizer: Any,
        system_prompt: str | None,
        verifiers: dict[str, Verifier],
        timings: _Timings,
        progress: Progress,
    ) -> None:
        self.folder, self.prompts, self.sampler, self.tokenizer = folder, prompts, sampler, tokenizer
        self.system_prompt, self.verifiers, self.timings, self.progress = (
            system_prompt,
            verifiers,
            timings,
            progress,
        )

    def run(self, kind: str, indices: list[int], n: int, shard_size: int, seed: int) -> list[dict[str, Any]]:
        """Verified rows of every shard, in prompt order; only missing shards are generated or verified."""
        sample_dir, verified_dir = (self.folder / d for d in _SHARD_DIRS[kind])
        shards = [indices[s : s + shard_size] for s in range(0, len(indices), shard_size)]
        out: list[dict[str, Any]] = []
        for k, shard in enumerate(shards):
            name = f"shard-{k:05d}.jsonl"
            fresh = not (sample_dir / name).exists()
            if fresh:
                self._generate(sample_dir / name, shard, n, shard_seed(seed, kind, k))
                self.progress.log(f"factory: {kind} shard {k + 1}/{len(shards)} sampled")
            if fresh or not (verified_dir / name).exists():
                self._verify(sample_dir / name, verified_dir / name)
            out.extend(row for _, row in read_jsonl(verified_dir / name))
        return out

    def _generate(self, path: Path, shard: list[int], n: int, seed: int) -> None:
        ids = [
            prompt_ids(
                self.tokenizer, [{"role": "user", "content": self.prompts[i].prompt}], self.system_prompt
            )
            for i in shard
        ]
        start = time.perf_counter()
        outs = self.sampler.sample(ids, n, seed)
        if len(outs) != len(shard) or any(len(o) != n for o in outs):
            raise RuntimeError(
                f"sampler returned {[len(o) for o in outs]} samples for {len(shard)} prompts x {n}"
            )
        rows = [
            {"index": i, "sample": j, "text": text, "finished": bool(finished)}
            for i, samples in zip(shard, outs, strict=True)
            for j, (text, finished) in enumerate(samples)
        ]
        write_jsonl_atomic(path, rows)
        self.timings.add("generation_s", f"{path.parent.name}/{path.name}", time.perf_counter() - start)

    def _verify(self, samples: Path, path: Path) -> None:
        start = time.perf_counter()
        rows = []
        for _, row in read_jsonl(samples):
            prompt = self.prompts[row["index"]]
            verdict = verify_row(self.verifiers[prompt.verifier], prompt, row["text"])
            rows.append(
                {
                    "index": row["index"],
                    "sample": row["sample"],
                    "task": prompt.task,
                    "text": row["text"],
                    "finished": row["finished"],
                    "correct": bool(verdict.correct),
                    "extracted": verdict.extracted,
                    "reason": verdict.reason,
                }
            )
        write_jsonl_atomic(path, rows)
        self.timings.add("verification_s", f"{path.parent.name}/{path.name}", time.perf_counter() - start)


def _apply_limits(verifiers: dict[str, Verifier], cfg: FactoryConfig) -> None:
    """Give the program verifier the recipe's sandbox limits (verifiers without limits ignore them)."""
    for verifier in verifiers.values():
        if hasattr(verifier, "limits"):
            from distill.reasoning.sandbox import Limits

            limits = Limits(
                cpu_s=cfg.sandbox.cpu_s, wall_s=cfg.sandbox.wall_s, memory_mb=cfg.sandbox.memory_mb
            )
            verifier.limits = limits  # type: ignore[attr-defined]  # the program verifier's


def _accuracy(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The teacher's own accuracy on its held-out samples, in total and per task."""
    by_task: dict[str, list[bool]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(bool(row["correct"]))

    def acc(xs: list[bool]) -> dict[str, Any]:
        return {"samples": len(xs), "correct": sum(xs), "accuracy": sum(xs) / len(xs) if xs else 0.0}

    return {
        "total": acc([x for xs in by_task.values() for x in xs]),
        "tasks": {t: acc(by_task[t]) for t in sorted(by_task)},
    }


def _per_task(prompts: list[PromptRow], indices: list[int]) -> dict[str, int]:
    out = {p.task: 0 for p in prompts}
    for i in indices:
        out[prompts[i].task] += 1
    return out


def run_factory(
    cfg: FactoryConfig,
    sampler: Sampler,
    tokenizer: Any,
    *,
    name: str,
    seed: int,
    system_prompt: str | None = None,
    progress: Progress | None = None,
) -> FactoryOutput:
    """Run (or resume) the factory into `cfg.output` (formatted with `name`) and return its manifest."""
    progress = progress or NullProgress()
    folder = factory_folder(cfg, name)
    prompts = load_prompts(cfg, seed)
    verifiers = open_verifiers(prompts, cfg.allow_unisolated)
    _apply_limits(verifiers, cfg)
    fingerprint = factory_fingerprint(cfg, prompts, sampler.ident, seed, system_prompt)
    _check_folder(folder, fingerprint)
    train, heldout = _split(folder, prompts, cfg, seed, fingerprint)
    timings = _Timings(folder)
    shards = _Shards(folder, prompts, sampler, tokenizer, system_prompt, verifiers, timings, progress)
    verified = shards.run("train", train, cfg.samples, cfg.shard_size, seed)
    write_jsonl_atomic(folder / VERIFIED, verified)
    files = [SPLIT, PROMPTS]
    teacher_heldout = None
    if cfg.heldout_samples and heldout:
        held_rows = shards.run("heldout", heldout, cfg.heldout_samples, cfg.shard_size, seed)
        write_jsonl_atomic(folder / HELDOUT_VERIFIED, held_rows)
        teacher_heldout = _accuracy(held_rows)
        files.append(HELDOUT_VERIFIED)
    status = select_samples(verified, cfg.dedup, cfg.filters)
    files += [VERIFIED, *write_views(folder, prompts, verified, status, heldout, cfg.max_pairs_per_prompt)]
    kept: dict[int, list[str]] = {i: [] for i in train}
    for row, s in zip(verified, status, strict=True):
        if s == KEPT:
            kept[row["index"]].append(row["text"])
    report = contamination(
        [prompts[i].prompt for i in heldout],
        [prompts[i].prompt for i in train],
        [kept[i] for i in train],
        n=cfg.contamination_ngram,
    )
    for example in report["examples"]:
        example["index"] = heldout[example.pop("heldout")]
    counts, drops = funnel(verified, status, _per_task(prompts, train))
    for kind in ["train", "heldout"] if teacher_heldout is not None else ["train"]:
        for d in _SHARD_DIRS[kind]:
            files += sorted(f"{d}/{p.name}" for p in (folder / d).glob("shard-*.jsonl"))
    generation_s, verification_s = timings.total("generation_s"), timings.total("verification_s")
    busy_min = (generation_s + verification_s) / 60
    manifest = {
        "fingerprint": fingerprint,
        "name": name,
        "seed": seed,
        "teacher": sampler.ident,
        "system_prompt": system_prompt,
        "config": cfg.model_dump(),
        "prompts_sha256": sha256_json([p.row() for p in prompts]),
        "split": {
            "train": len(train),
            "heldout": len(heldout),
            "tasks": {
                t: {"train": n, "heldout": h}
                for (t, n), h in zip(
                    _per_task(prompts, train).items(), _per_task(prompts, heldout).values(), strict=True
                )
            },
        },
        "funnel": counts,
        "drops": drops,
        "teacher_heldout": teacher_heldout,
        "contamination": report,
        "files": {f: _sha256_file(folder / f) for f in files},
        "timings": {
            "generation_s": generation_s,
            "verification_s": verification_s,
            "verified_per_minute": round(counts["total"]["verified"] / busy_min, 3) if busy_min > 0 else None,
        },
    }
    write_json_atomic(folder / MANIFEST, manifest)
    total = counts["total"]
    progress.log(
        f"factory: {total['generated']} samples, {total['verified']} correct, {total['kept']} kept -> {folder}"
    )
    return FactoryOutput(folder, manifest)
