"""Path resolution shared by recipes, data and models; imports no torch so validation stays instant."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from distill.errors import InputError


def resolve_path(path: str) -> Path:
    """`pkg:NAME[/sub/path]` -> the folder of an installed package (models shipped on PyPI); else a path."""
    if path.startswith("pkg:"):
        name, _, rest = path[4:].partition("/")
        try:  # a dotted name imports its parent package; an empty or relative one is refused
            spec = importlib.util.find_spec(name) if name else None
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise InputError(f"model path {path!r}: Python package {name!r} is not installed")
        root = Path(next(iter(spec.submodule_search_locations)))
        return root / rest if rest else root
    return Path(path).expanduser()
