"""Turn a classifier recipe's data section into one table of rows and the index sets a run uses:
training rows (labelled, and unlabelled where labels are withheld), validation rows carved from training
(for best-on-validation), and test rows, used once at the end. For graphs the rows are nodes and the
edges stay with the graph, for the GNN teacher."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.classifier.batches import UNLABELLED
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
from distill.graphs.sbm import Graph
from distill.paths import resolve_path
from distill.recipe_classifier import (
    ClassifierRecipe,
    DigitsDataConfig,
    GraphFilesDataConfig,
    ImageFolderDataConfig,
    TensorDataConfig,
)

TableDataConfig = DigitsDataConfig | TensorDataConfig | ImageFolderDataConfig


@dataclass
class Rows:
    """Every row of the run in one table; `y_train` hides the withheld labels (UNLABELLED)."""

    x: torch.Tensor
    y: torch.Tensor  # true labels of every row (test labels are read only by evaluation)
    y_train: torch.Tensor  # what training sees
    train: torch.Tensor  # row ids of the training rows (labelled or not)
    labelled: torch.Tensor  # row ids of the labelled training rows
    val: torch.Tensor
    test: torch.Tensor
    classes: int
    name: str
    class_names: list[str]
    graph: Graph | None = None

    @property
    def in_shape(self) -> list[int]:
        return list(self.x.shape[1:])

    def describe(self) -> dict[str, int | str]:
        return {
            "name": self.name,
            "classes": self.classes,
            "train_rows": len(self.train),
            "labelled_rows": len(self.labelled),
            "validation_rows": len(self.val),
            "test_rows": len(self.test),
        }


def _load_table(d: TableDataConfig) -> ClassifierData:
    if d.kind == "digits":
        return load_digits_data(d.test_fraction, d.split_seed)
    if d.kind == "tensors":
        return load_tensor_file(resolve_path(d.path), d.test_fraction, d.split_seed)
    if d.kind == "images":
        return load_image_folder(resolve_path(d.path), d.image_size, d.test_fraction, d.split_seed)
    raise AssertionError(d.kind)


def table_rows(d: TableDataConfig) -> Rows:
    """Rows of a digits / tensor-file / image-folder data section (also the dataset-distillation family's)."""
    data = _load_table(d)
    x_tr, y_tr, x_val, y_val = split_validation(
        data.x_train, data.y_train, d.validation_fraction, d.split_seed
    )
    x_tr, x_val, x_te = standardize(x_tr, x_val, data.x_test)
    x = torch.cat([x_tr, x_val, x_te])
    y = torch.cat([y_tr, y_val, data.y_test])
    n_tr, n_val = len(y_tr), len(y_val)
    train = torch.arange(n_tr)
    keep = label_subset(y_tr, d.label_fraction, d.split_seed)
    return _rows(
        x,
        y,
        train,
        train[keep],
        torch.arange(n_tr, n_tr + n_val),
        torch.arange(n_tr + n_val, len(y)),
        data.classes,
        data.name,
        data.class_names,
    )


def _rows(
    x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, labelled: torch.Tensor, val: torch.Tensor,
    test: torch.Tensor, classes: int, name: str, class_names: list[str], graph: Graph | None = None,
) -> Rows:  # fmt: skip
    y_train = torch.full_like(y, UNLABELLED)
    y_train[labelled] = y[labelled]
    return Rows(
        x,
        y,
        y_train,
        train,
        labelled,
        val,
        test,
        classes,
        name,
        class_names or [str(c) for c in range(classes)],
        graph,
    )


def _graph_rows(recipe: ClassifierRecipe) -> Rows:
    """Planetoid-style splits: `train_per_class` labelled nodes, validation, and the remaining nodes split
    in two: an unlabelled pool (its features and the teacher's soft labels may train the student) and the
    test nodes, which the student never sees in training."""
    from distill.graphs.sbm import stochastic_block_model

    d = recipe.data
    if d.kind == "sbm":
        graph = stochastic_block_model(
            d.nodes, d.classes, d.features, d.avg_degree, d.homophily, d.feature_signal, d.train_per_class,
            d.validation_fraction, d.split_seed,
        )  # fmt: skip
    else:
        from distill.graphs.files import load_graph_files

        assert isinstance(d, GraphFilesDataConfig)
        graph = load_graph_files(
            resolve_path(d.edges), resolve_path(d.features), resolve_path(d.labels),
            train_per_class=d.train_per_class, val_fraction=d.validation_fraction, seed=d.split_seed,
        )  # fmt: skip
    rest = graph.test_idx[
        torch.randperm(len(graph.test_idx), generator=torch.Generator().manual_seed(d.split_seed))
    ]
    pool, test = rest[: len(rest) // 2].sort().values, rest[len(rest) // 2 :].sort().values
    graph.test_idx = test
    train = torch.cat([graph.train_idx, pool]).sort().values
    return _rows(
        graph.x, graph.y, train, graph.train_idx, graph.val_idx, test, graph.classes, graph.name, [], graph
    )


def load_rows(recipe: ClassifierRecipe) -> Rows:
    """The run's rows; bad files give one line naming the file (InputError), bad values a RecipeError."""
    try:
        if isinstance(recipe.data, DigitsDataConfig | TensorDataConfig | ImageFolderDataConfig):
            return table_rows(recipe.data)
        return _graph_rows(recipe)
    except ValueError as err:
        raise InputError(f"data: {err}") from None


def stream_rows(rows: Rows, with_unlabelled: bool) -> torch.Tensor:
    """The rows a method trains on: every training row, or only the labelled ones."""
    return rows.train if with_unlabelled else rows.labelled
