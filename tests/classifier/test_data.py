from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from distill.classifier.data import (
    ClassifierData,
    label_subset,
    load_digits_data,
    load_image_folder,
    load_tensor_file,
    split_validation,
    standardize,
)
from distill.errors import InputError


@pytest.fixture(scope="module")
def digits() -> ClassifierData:
    return load_digits_data()


def test_digits_loads(digits: ClassifierData) -> None:
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert digits.classes == 10 and digits.class_names == [str(i) for i in range(10)]
    assert digits.x_train.shape[1:] == (1, 8, 8) and digits.in_shape == (1, 8, 8)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert float(digits.x_train.min()) >= 0.0 and float(digits.x_train.max()) <= 1.0
    assert abs(len(digits.x_test) - 0.25 * 1797) <= 10
    assert set(digits.y_test.tolist()) == set(range(10))


def test_digits_test_split_is_fixed(digits: ClassifierData) -> None:
    again = load_digits_data()
    assert torch.equal(again.x_test, digits.x_test) and torch.equal(again.y_test, digits.y_test)
    other = load_digits_data(seed=1)
    assert not torch.equal(other.y_test, digits.y_test)


def _per_class(y: torch.Tensor) -> dict[int, int]:
    return {int(c): int((y == c).sum()) for c in torch.unique(y)}


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_label_subset_is_stratified(digits: ClassifierData, fraction: float) -> None:
    y = digits.y_train
    mask = label_subset(y, fraction, seed=3)
    assert mask.dtype == torch.bool and mask.shape == y.shape
    kept, total = _per_class(y[mask]), _per_class(y)
    assert set(kept) == set(total)  # >= 1 label per class
    for c, n in total.items():
        assert abs(kept[c] - fraction * n) <= 1 or kept[c] == 1
    assert torch.equal(mask, label_subset(y, fraction, seed=3))
    if fraction < 1:
        assert not torch.equal(mask, label_subset(y, fraction, seed=4))


def test_label_subset_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="label fraction"):
        label_subset(torch.tensor([0, 1]), 0.0, seed=0)


def test_split_validation(digits: ClassifierData) -> None:
    x_tr, y_tr, x_val, y_val = split_validation(digits.x_train, digits.y_train, 0.2, seed=0)
    assert len(x_tr) + len(x_val) == len(digits.x_train)
    for c, n in _per_class(digits.y_train).items():
        assert abs(int((y_val == c).sum()) - 0.2 * n) <= 1
    assert x_tr.shape[1:] == x_val.shape[1:] == (1, 8, 8)
    x_tr0, _, x_val0, _ = split_validation(digits.x_train, digits.y_train, 0.0, seed=0)
    assert len(x_val0) == 0 and len(x_tr0) == len(digits.x_train)


def test_standardize_uses_train_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    x_train = torch.randn(50, 3, 4, 4, generator=gen) * torch.tensor([1.0, 2.0, 3.0])[:, None, None] + 5
    x_test = x_train[:5] * 10
    s_train, s_test = standardize(x_train, x_test)
    assert torch.allclose(s_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(s_train.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5)
    assert not torch.allclose(s_test.mean(dim=(0, 2, 3)), torch.zeros(3), atol=0.5)
    (flat,) = standardize(torch.tensor([[1.0, 7.0], [3.0, 7.0]]))
    assert torch.equal(flat, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))


def test_tensor_file(tmp_path: Path) -> None:
    x, y = torch.rand(40, 5), torch.arange(40) % 4
    path = tmp_path / "toy.safetensors"
    save_file({"x": x, "y": y}, str(path), metadata={"class_names": json.dumps(["a", "b", "c", "d"])})
    data = load_tensor_file(path)
    assert data.name == "toy" and data.classes == 4 and data.class_names == ["a", "b", "c", "d"]
    assert len(data.x_train) + len(data.x_test) == 40 and set(data.y_test.tolist()) == {0, 1, 2, 3}

    save_file({"x": x, "y": y, "x_test": x[:3].clone(), "y_test": y[:3].clone()}, str(path))
    data = load_tensor_file(path)
    assert (
        torch.equal(data.x_test, x[:3])
        and len(data.x_train) == 40
        and data.class_names == ["0", "1", "2", "3"]
    )


def test_tensor_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"x": torch.rand(4, 2)}, str(path))
    with pytest.raises(InputError, match=r"bad\.safetensors has no tensor 'y'"):
        load_tensor_file(path)
    save_file({"x": torch.rand(4, 2), "y": torch.zeros(4), "x_test": torch.rand(1, 2)}, str(path))
    with pytest.raises(InputError, match="'y_test'"):
        load_tensor_file(path)
    with pytest.raises(InputError, match="does not exist"):
        load_tensor_file(tmp_path / "missing.safetensors")
    path.write_text("not safetensors")
    with pytest.raises(InputError, match="cannot read tensor file"):
        load_tensor_file(path)


def _write_images(root: Path, mode: str, per_class: int = 4) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (10, 12) if mode == "L" else (10, 12, 3)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / name / f"{i}.png")


def test_image_folder(tmp_path: Path) -> None:
    _write_images(tmp_path / "gray", "L")
    data = load_image_folder(tmp_path / "gray", image_size=8)
    assert data.class_names == ["cat", "dog"] and data.classes == 2
    assert data.x_train.shape[1:] == (1, 8, 8) and len(data.x_train) + len(data.x_test) == 8
    assert set(data.y_test.tolist()) == {0, 1}

    _write_images(tmp_path / "split" / "train", "RGB")
    _write_images(tmp_path / "split" / "test", "RGB", per_class=1)
    data = load_image_folder(tmp_path / "split", image_size=6)
    assert data.x_train.shape == (8, 3, 6, 6) and data.x_test.shape == (2, 3, 6, 6)
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) <= 1.0


def test_image_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(InputError, match="has no images"):
        load_image_folder(tmp_path / "empty", image_size=8)
    with pytest.raises(InputError, match="no class subfolders"):
        load_image_folder(tmp_path / "empty" / "cat", image_size=8)
    _write_images(tmp_path / "broken", "L")
    (tmp_path / "broken" / "dog" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"cannot read image .*bad\.png"):
        load_image_folder(tmp_path / "broken", image_size=8)


def test_saved_dataset_folder(tmp_path: Path) -> None:
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)) for _ in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1] * 3}, features=features)
    datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(str(tmp_path / "ds"))
    data = load_image_folder(tmp_path / "ds", image_size=4)
    assert data.x_train.shape == (6, 3, 4, 4) and data.x_test.shape == (2, 3, 4, 4)
    assert data.class_names == ["x", "y"] and data.y_test.tolist() == [0, 1]

    ds.remove_columns("label").save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(InputError, match="no 'label' column"):
        load_image_folder(tmp_path / "nolabel", image_size=4)
