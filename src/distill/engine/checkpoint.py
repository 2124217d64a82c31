"""Checkpoints that resume exactly: every trainable module (safetensors), optimizers, schedulers, the RNG
states of every process, the data position and the method's own state.

Each checkpoint is written into a temporary folder and renamed into place, so a folder named `step-N`
is complete when it exists; a run killed mid-write leaves a temp folder, which is ignored and removed.
A `checksums.json` (sha256 of every file) is written last: on resume a checkpoint whose files do not
match (truncated by a full disk, corrupted by a copy) is skipped for the newest intact one, and the
caller is told which.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from distill.errors import InputError
from distill.io import fsync_dir

PREFIX = "step-"
CHECKSUMS = "checksums.json"
STATE = "trainer_state.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    folder: Path, step: int, modules: dict[str, torch.nn.Module], state: dict[str, Any], keep: int = 2
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    try:
        for name, module in modules.items():
            save_model(module, str(tmp / f"{name}.safetensors"))
        torch.save(state, tmp / STATE)
        sums = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
        final = folder / f"{PREFIX}{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def damaged_file(path: Path) -> str | None:
    """The first file of checkpoint `path` that is missing or differs from its checksum; None if intact."""
    sums_file = path / CHECKSUMS
    try:
        sums = json.loads(sums_file.read_text())
    except (OSError, ValueError):
        return CHECKSUMS
    if not isinstance(sums, dict) or STATE not in sums:
        return CHECKSUMS
    for name, digest in sums.items():
        file = path / name
        if not file.is_file() or _sha256(file) != digest:
            return name
    return None


def latest_intact_checkpoint(folder: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files match their checksums, and one note per damaged newer one."""
    for stale in folder.glob(".tmp-*") if folder.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
    notes: list[str] = []
    for path in reversed(list_checkpoints(folder)):
        bad = damaged_file(path)
        if bad is None:
            return path, notes
        notes.append(f"checkpoint {path.name} is damaged ({bad} missing or not matching its checksum)")
    if notes:
        raise InputError(f"{folder}: no intact checkpoint to resume from; {notes[0]}")
    return None, notes


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """Load weights into `modules` in place and return the trainer state (weights_only: no pickled code)."""
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise InputError(f"checkpoint {path} has no {file.name} (was it made by another method?)")
        try:
            load_model(module, str(file))
        except Exception as err:  # safetensors raises its own error types on bad headers / shapes
            raise InputError(f"cannot load {file}: {str(err).splitlines()[0]}") from None
    try:
        state: dict[str, Any] = torch.load(path / STATE, weights_only=True)
    except (OSError, RuntimeError) as err:
        raise InputError(f"cannot read {path / STATE}: {err}") from None
    return state
