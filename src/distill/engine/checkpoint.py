"""Checkpoints that resume exactly: weights (safetensors), optimizer, scheduler, RNG states, data position.

Each checkpoint is written into a temporary folder and renamed into place, so a folder named `step-N`
is always complete; a run killed mid-write leaves only a temp folder, which is ignored and cleaned.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from distill.errors import InputError

PREFIX = "step-"


def save_checkpoint(
    folder: Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    try:
        for name, module in modules.items():
            save_model(module, str(tmp / f"{name}.safetensors"))
        torch.save(state, tmp / "trainer_state.pt")
        final = folder / f"{PREFIX}{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(folder: Path) -> Path | None:
    for stale in folder.glob(".tmp-*") if folder.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """Load weights into `modules` in place and return the trainer state (weights_only: no pickled code)."""
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise InputError(f"checkpoint {path} has no {file.name}")
        load_model(module, str(file))
    try:
        state: dict[str, Any] = torch.load(path / "trainer_state.pt", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise InputError(f"cannot read {path / 'trainer_state.pt'}: {err}") from None
    return state
