"""Load a node-classification graph from plain files: an edge list, a feature matrix and a label list.

Every problem becomes a one-line `InputError` naming the file (and the line, for text files), so a user
with a hand-made edge list learns exactly what to fix instead of reading a numpy traceback.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distill.errors import InputError
from distill.graphs.sbm import Graph, make_splits, undirected_edges

_SEP = re.compile(r"[,\s]+")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _read_text(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror or _one_line(err)})") from None


def _data_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(1-based line number, tokens) for each line that is not blank or a `#` comment."""
    out = []
    for number, raw in enumerate(_read_text(path), start=1):
        text = raw.split("#", 1)[0].strip()
        if text:
            out.append((number, [t for t in _SEP.split(text) if t]))
    return out


def read_edges(path: str | Path, num_nodes: int) -> Tensor:
    """An undirected `edge_index` from an edge list: two integer node ids per line (whitespace or comma
    separated, `#` comments). Either or both directions may be listed; self loops are dropped."""
    path = Path(path)
    src: list[int] = []
    dst: list[int] = []
    for number, tokens in _data_lines(path):
        try:
            if len(tokens) != 2:
                raise ValueError
            a, b = int(tokens[0]), int(tokens[1])
        except ValueError:
            raise InputError(
                f"{path} line {number}: expected two node ids, got {' '.join(tokens)!r}"
            ) from None
        for node in (a, b):
            if not 0 <= node < num_nodes:
                raise InputError(
                    f"{path} line {number}: node id {node} out of range (the graph has {num_nodes} nodes, "
                    f"ids 0..{num_nodes - 1})"
                )
        src.append(a)
        dst.append(b)
    return undirected_edges(torch.tensor([src, dst], dtype=torch.long).view(2, -1), num_nodes)


def _features_csv(path: Path) -> np.ndarray:
    rows: list[list[float]] = []
    width = -1
    for i, (number, tokens) in enumerate(_data_lines(path)):
        try:
            row = [float(t) for t in tokens]
        except ValueError:
            if i == 0 and all(not _is_number(t) for t in tokens):
                continue  # a header line
            bad = next(t for t in tokens if not _is_number(t))
            raise InputError(f"{path} line {number}: not a number: {bad!r}") from None
        if width < 0:
            width = len(row)
        elif len(row) != width:
            raise InputError(f"{path} line {number}: expected {width} values, got {len(row)}")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no feature rows")
    return np.asarray(rows, dtype=np.float32)


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def read_features(path: str | Path) -> Tensor:
    """The (N, F) float32 feature matrix from .npy, .safetensors (tensor `x`) or CSV/whitespace text (one
    row per node, optional header line, `#` comments)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: cannot read .npy ({_one_line(err)})") from None
        if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
            raise InputError(f"{path}: features must be real numbers, got dtype {array.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    elif suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                keys = list(fh.keys())
                if "x" not in keys:
                    raise InputError(f"{path}: no tensor named 'x' (found: {', '.join(keys) or 'none'})")
                x = fh.get_tensor("x")
        except InputError:
            raise
        except Exception as err:  # safetensors raises its own error types on bad headers
            raise InputError(f"{path}: cannot read .safetensors ({_one_line(err)})") from None
        if x.is_complex() or x.dtype == torch.bool:
            raise InputError(f"{path}: features must be real numbers, got dtype {x.dtype}")
        x = x.float()
    else:
        x = torch.from_numpy(_features_csv(path))
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(
            f"{path}: features must be a non-empty 2-D (nodes, features) matrix, got {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        row = int(torch.nonzero(~torch.isfinite(x))[0, 0])
        raise InputError(f"{path}: node {row} has a non-finite feature (nan or inf)")
    return x.contiguous()


def read_labels(path: str | Path) -> Tensor:
    """(N,) int64 class labels, one non-negative integer per line (`#` comments and blank lines skipped)."""
    path = Path(path)
    labels: list[int] = []
    for number, tokens in _data_lines(path):
        try:
            if len(tokens) != 1:
                raise ValueError
            label = int(tokens[0])
        except ValueError:
            raise InputError(
                f"{path} line {number}: expected one integer label, got {' '.join(tokens)!r}"
            ) from None
        if label < 0:
            raise InputError(f"{path} line {number}: labels must be >= 0, got {label}")
        labels.append(label)
    if not labels:
        raise InputError(f"{path}: no labels")
    return torch.tensor(labels, dtype=torch.long)


def load_graph_files(
    edges_path: str | Path,
    features_path: str | Path,
    labels_path: str | Path,
    *,
    train_per_class: int = 20,
    val_fraction: float = 0.2,
    seed: int = 0,
    name: str | None = None,
) -> Graph:
    """A `Graph` from files, with splits made as for the SBM (`train_per_class` labelled nodes per class,
    `val_fraction` of the rest for validation, the remainder test; deterministic by `seed`).

    Node ids are rows of the feature matrix (0-based); the label file has one line per node. The number
    of classes is `max(label) + 1`. Raises `InputError` (one line, naming the file and line) on bad input.
    """
    features_path, labels_path = Path(features_path), Path(labels_path)
    x = read_features(features_path)
    y = read_labels(labels_path)
    if y.numel() != x.shape[0]:
        raise InputError(f"{labels_path}: {y.numel()} labels but {features_path} has {x.shape[0]} nodes")
    edge_index = read_edges(edges_path, x.shape[0])
    classes = int(y.max()) + 1
    train_idx, val_idx, test_idx = make_splits(y, classes, train_per_class, val_fraction, seed)
    return Graph(
        x=x,
        y=y,
        edge_index=edge_index,
        classes=classes,
        train_idx=train_idx,
        val_idx=val_idx,
        test_idx=test_idx,
        name=name if name is not None else Path(edges_path).stem,
    )
