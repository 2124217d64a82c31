"""Classifier datasets as in-memory tensors, and the stratified splits KD experiments need.

Every split here is stratified and seeded on its own generator: the test split depends only on the
dataset's seed (never on a training seed), so runs with different training seeds are scored on the same
rows, and a label subset keeps at least one example of every class.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclass
class ClassifierData:
    """Train and test tensors: x float32 (N, C, H, W) or (N, F), y int64 class ids in [0, classes)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int
    name: str
    class_names: list[str] = field(default_factory=list)

    @property
    def in_shape(self) -> tuple[int, ...]:
        """One sample's shape, what `build_model` takes."""
        return tuple(self.x_train.shape[1:])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _stratified_mask(y: torch.Tensor, fraction: float, seed: int, low: int, high_slack: int) -> torch.Tensor:
    """Pick round(fraction * n_c) rows of each class c (clamped to [low, n_c - high_slack]); rows with a
    negative label are never picked. Classes are visited in sorted order so the pick is reproducible."""
    gen = torch.Generator().manual_seed(int(seed))
    mask = torch.zeros(len(y), dtype=torch.bool)
    for c in torch.unique(y[y >= 0]).tolist():
        rows = torch.nonzero(y == c).flatten()
        n = len(rows)
        k = max(low, min(round(fraction * n), n - high_slack))
        k = max(0, min(k, n))
        mask[rows[torch.randperm(n, generator=gen)[:k]]] = True
    return mask


def _check_fraction(name: str, fraction: float, allow_zero: bool, allow_one: bool) -> None:
    lo_ok = fraction >= 0 if allow_zero else fraction > 0
    hi_ok = fraction <= 1 if allow_one else fraction < 1
    if not (lo_ok and hi_ok):
        lo, hi = "[0" if allow_zero else "(0", "1]" if allow_one else "1)"
        raise ValueError(f"{name} must be in {lo}, {hi} (got {fraction})")


def _split_test(
    x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_fraction("test_fraction", test_fraction, allow_zero=False, allow_one=False)
    test = _stratified_mask(y, test_fraction, seed, low=1, high_slack=1)
    return x[~test], y[~test], x[test], y[test]


def split_validation(
    x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_tr, y_tr, x_val, y_val): a stratified `fraction` of the training rows held out for model
    selection, so the test set is never looked at before the end. Each class keeps >= 1 training row."""
    _check_fraction("validation fraction", fraction, allow_zero=True, allow_one=False)
    val = _stratified_mask(y, fraction, seed, low=0, high_slack=1)
    return x[~val], y[~val], x[val], y[val]


def label_subset(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Bool mask of the training rows whose labels are kept (a stratified `fraction`, >= 1 per class);
    semi-supervised KD methods treat the other rows as unlabelled (label -1)."""
    _check_fraction("label fraction", fraction, allow_zero=False, allow_one=True)
    return _stratified_mask(y, fraction, seed, low=1, high_slack=0)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and std shaped to broadcast against x; a constant channel gets std 1."""
    if x.ndim < 2:
        raise ValueError(f"expected a batch (N, C, ...) or (N, F); got shape {tuple(x.shape)}")
    dims = [0, *range(2, x.ndim)]
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, unbiased=False)
    return mean, torch.where(std > 1e-8, std, torch.ones_like(std))


def standardize(x_train: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Zero-mean, unit-std channels using statistics of the training set only (no test leakage)."""
    mean, std = channel_stats(x_train)
    return tuple((x - mean) / std for x in (x_train, *others))


def load_digits_data(test_fraction: float = 0.25, seed: int = 0) -> ClassifierData:
    """sklearn's 8x8 digits (1797 images) as (N, 1, 8, 8) in [0, 1]; the test split depends on `seed`
    alone, which callers keep fixed across training seeds."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    x_tr, y_tr, x_te, y_te = _split_test(x, y, test_fraction, seed)
    return ClassifierData(x_tr, y_tr, x_te, y_te, 10, "digits", [str(d) for d in range(10)])


def _labels(y: torch.Tensor, where: str) -> torch.Tensor:
    if y.ndim != 1:
        raise InputError(f"{where}: labels must be 1-D (got shape {tuple(y.shape)})")
    if y.is_floating_point() and not bool(torch.all(y == y.round())):
        raise InputError(f"{where}: labels must be integer class ids")
    y = y.to(torch.int64)
    if len(y) and int(y.min()) < 0:
        raise InputError(f"{where}: labels must be >= 0 (found {int(y.min())})")
    return y


def load_tensor_file(path: str | Path, test_fraction: float = 0.25, seed: int = 0) -> ClassifierData:
    """A .safetensors file with `x` and `y` (and optionally `x_test`, `y_test`; without them a stratified
    test split is carved out by `seed`). Metadata `class_names` (a JSON list) names the classes."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"tensor file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in ("x", "y", "x_test", "y_test") if k in keys}
    except Exception as exc:
        raise InputError(f"cannot read tensor file {path}: {_first_line(exc)}") from None
    for key in ("x", "y"):
        if key not in tensors:
            raise InputError(
                f"tensor file {path} has no tensor '{key}' (needs x and y; optional x_test, y_test)"
            )
    if ("x_test" in tensors) != ("y_test" in tensors):
        missing = "y_test" if "x_test" in tensors else "x_test"
        raise InputError(f"tensor file {path} has no tensor '{missing}' (x_test and y_test go together)")
    x, y = tensors["x"].float(), _labels(tensors["y"], f"{path} 'y'")
    if x.ndim < 2 or len(x) != len(y):
        raise InputError(f"tensor file {path}: 'x' {tuple(x.shape)} does not match 'y' {tuple(y.shape)}")
    if "x_test" in tensors:
        x_te, y_te = tensors["x_test"].float(), _labels(tensors["y_test"], f"{path} 'y_test'")
        if x_te.shape[1:] != x.shape[1:] or len(x_te) != len(y_te):
            raise InputError(f"tensor file {path}: 'x_test' {tuple(x_te.shape)} does not match 'x'/'y_test'")
        x_tr, y_tr = x, y
    else:
        x_tr, y_tr, x_te, y_te = _split_test(x, y, test_fraction, seed)
    names: list[str] = []
    if "class_names" in meta:
        try:
            names = [str(n) for n in json.loads(meta["class_names"])]
        except (ValueError, TypeError):
            raise InputError(f"tensor file {path}: metadata class_names is not a JSON list") from None
    classes = max(len(names), int(torch.cat([y_tr, y_te]).max()) + 1 if len(y_tr) + len(y_te) else 0)
    names += [str(i) for i in range(len(names), classes)]
    return ClassifierData(x_tr, y_tr, x_te, y_te, classes, path.stem, names)


# ---------------------------------------------------------------- images


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise InputError(f"reading images needs Pillow, which does not import ({_first_line(exc)})") from None
    return Image


def _to_tensor(images: list[Any], sources: list[str], image_size: int) -> torch.Tensor:
    """Resize and stack PIL images as (N, C, S, S) in [0, 1]; one channel unless any image has colour."""
    image_mod = _pil()
    gray = all(im.mode in _GRAY_MODES for im in images)
    arrays = []
    for im, src in zip(images, sources, strict=True):
        try:
            im = im.convert("L" if gray else "RGB").resize((image_size, image_size), image_mod.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
        except Exception as exc:
            raise InputError(f"cannot read image {src}: {_first_line(exc)}") from None
        arrays.append(arr[None] if gray else arr.transpose(2, 0, 1))
    return (
        torch.from_numpy(np.stack(arrays))
        if arrays
        else torch.zeros(0, 1 if gray else 3, image_size, image_size)
    )


def _same_channels(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One split all grayscale and the other in colour: colour for both, so one model fits both."""
    if a.shape[1] == b.shape[1]:
        return a, b
    return a.expand(-1, 3, -1, -1).clone() if a.shape[1] == 1 else a, b.expand(
        -1, 3, -1, -1
    ).clone() if b.shape[1] == 1 else b


def _open(file: Path) -> Any:
    image_mod = _pil()
    try:
        im = image_mod.open(file)
        im.load()
    except Exception as exc:
        raise InputError(f"cannot read image {file}: {_first_line(exc)}") from None
    return im


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_split(root: Path, class_names: list[str], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, sources, labels = [], [], []
    for label, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            continue
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                images.append(_open(file))
                sources.append(str(file))
                labels.append(label)
    if not images:
        raise InputError(f"image folder {root} has no images (expected {root}/<class>/*.png|jpg)")
    return _to_tensor(images, sources, image_size), torch.tensor(labels, dtype=torch.int64)


def _is_saved_dataset(root: Path) -> bool:
    return any((root / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _row_image(value: Any, image_mod: Any) -> Any:
    if isinstance(value, image_mod.Image):
        return value
    if isinstance(value, dict) and value.get("bytes"):
        return image_mod.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return image_mod.open(value["path"])
    arr = np.asarray(value)
    if arr.dtype != np.uint8:  # floats in [0, 1] or [0, 255]
        scale = 255.0 if arr.size and float(arr.max()) <= 1.0 else 1.0
        arr = np.clip(arr.astype(np.float32) * scale, 0, 255).round().astype(np.uint8)
    return image_mod.fromarray(arr)


def _dataset_rows(ds: Any, root: Path, split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    image_mod = _pil()
    for col in ("image", "label"):
        if col not in ds.column_names:
            raise InputError(
                f"dataset {root} split '{split}' has no '{col}' column (has {', '.join(ds.column_names)})"
            )
    images, sources = [], []
    for i, value in enumerate(ds["image"]):
        src = f"{root} split '{split}' row {i}"
        try:
            images.append(_row_image(value, image_mod))
        except Exception as exc:
            raise InputError(f"cannot read image {src}: {_first_line(exc)}") from None
        sources.append(src)
    if not images:
        raise InputError(f"dataset {root} split '{split}' has no rows")
    labels = list(ds["label"])
    for i, value in enumerate(labels):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"dataset {root} split '{split}' row {i}: label {value!r} is not a class id")
    return _to_tensor(images, sources, image_size), _labels(torch.tensor(labels), f"{root} 'label'")


def _load_saved_dataset(root: Path, image_size: int, test_fraction: float, seed: int) -> ClassifierData:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as exc:
        raise InputError(f"cannot load dataset {root}: {_first_line(exc)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        train_key = "train" if "train" in loaded else next(iter(loaded))
        train = loaded[train_key]
        test = loaded.get("test")
    else:
        train_key, train, test = "train", loaded, None
    x, y = _dataset_rows(train, root, train_key, image_size)
    if test is not None:
        x_te, y_te = _dataset_rows(test, root, "test", image_size)
        (x_tr, x_te), y_tr = _same_channels(x, x_te), y
    else:
        x_tr, y_tr, x_te, y_te = _split_test(x, y, test_fraction, seed)
    classes = int(torch.cat([y_tr, y_te]).max()) + 1
    feature = train.features.get("label")
    names = [str(n) for n in getattr(feature, "names", None) or []]
    names += [str(i) for i in range(len(names), classes)]
    return ClassifierData(x_tr, y_tr, x_te, y_te, max(classes, len(names)), root.name, names)


def load_image_folder(
    path: str | Path, image_size: int, test_fraction: float = 0.25, seed: int = 0
) -> ClassifierData:
    """Images as (N, C, S, S) in [0, 1] (C = 1 if every image is grayscale, else 3) from either a
    class-per-subfolder tree (`root/<class>/*.png`, or `root/train/<class>` + `root/test/<class>`) or a
    `datasets` folder from `save_to_disk` with `image` and `label` columns. Without a test part a
    stratified test split is carved out by `seed`."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1 (got {image_size})")
    if _is_saved_dataset(root):
        return _load_saved_dataset(root, image_size, test_fraction, seed)
    split_layout = (root / "train").is_dir() and (root / "test").is_dir()
    train_root = root / "train" if split_layout else root
    class_names = [p.name for p in _class_dirs(train_root)]
    if not class_names:
        raise InputError(
            f"image folder {train_root} has no class subfolders (expected {train_root}/<class>/*.png)"
        )
    x, y = _read_split(train_root, class_names, image_size)
    if split_layout:
        extra = sorted({p.name for p in _class_dirs(root / "test")} - set(class_names))
        if extra:
            raise InputError(
                f"image folder {root / 'test'} has classes missing from train: {', '.join(extra)}"
            )
        x_te, y_te = _read_split(root / "test", class_names, image_size)
        x_tr, y_tr = x, y
        x_tr, x_te = _same_channels(x_tr, x_te)
    else:
        x_tr, y_tr, x_te, y_te = _split_test(x, y, test_fraction, seed)
    return ClassifierData(x_tr, y_tr, x_te, y_te, len(class_names), root.name, class_names)
