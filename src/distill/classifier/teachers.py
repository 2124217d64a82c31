"""The classifier family's teacher: trained by the run once (through the same engine, with the
cross-entropy method) and stored by a fingerprint of data and teacher settings, so every seed, method and
resumed run reuses it; or loaded from an exported folder; or an ensemble of members with their own seeds.
A GNN teacher trains full-batch on its graph and becomes a table of logits by node."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from distill.classifier.batches import TensorStream
from distill.classifier.models import build_model, model_config, model_from_config
from distill.classifier.prepare import Rows
from distill.configs.classifier import CEConfig
from distill.engine.trainer import train
from distill.errors import InputError, RecipeError
from distill.methods.classifier.base import ClassifierContext, TeacherNet, accuracy
from distill.methods.classifier.logits import CrossEntropy
from distill.paths import resolve_path
from distill.progress import Progress
from distill.recipe_base import TrainConfig
from distill.recipe_classifier import ClassifierRecipe, ClassifierTeacherConfig
from distill.recipe_condense import CondenseRecipe

TeacherRecipe = ClassifierRecipe | CondenseRecipe  # both have data, teacher, seed and train sections


def build(
    arch: str, in_shape: list[int], classes: int, options: dict[str, Any], field: str
) -> torch.nn.Module:
    try:
        return build_model(arch, in_shape, classes, options)
    except ValueError as err:
        raise RecipeError(f"{field}: {err}") from None


def load_exported(folder: Path, rows: Rows, field: str = "teacher.path") -> torch.nn.Module:
    """A model exported by this family (model.safetensors + config.json), checked against the data."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        model = model_from_config(config)
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
    except FileNotFoundError as err:
        raise InputError(f"{field}: {folder} lacks {Path(err.filename or '').name}") from None
    except (ValueError, RuntimeError, json.JSONDecodeError) as err:
        raise InputError(f"{field}: cannot load {folder}: {str(err).splitlines()[0]}") from None
    if int(config["classes"]) != rows.classes:
        raise InputError(f"{field}: the teacher has {config['classes']} classes, the data {rows.classes}")
    if list(config["in_shape"]) != rows.in_shape:
        raise InputError(
            f"{field}: the teacher takes inputs {config['in_shape']}, the data has {rows.in_shape}"
        )
    return model.eval()


def fingerprint(recipe: TeacherRecipe, member: int) -> str:
    t = recipe.teacher
    assert t is not None
    ignored = {"batch_size", "augment", "unlabelled"} | ({"label_fraction"} if t.full_labels else set())
    what = {
        "data": recipe.data.model_dump(mode="json", exclude=ignored),
        "teacher": t.model_dump(mode="json", exclude={"store", "ensemble", "path"}),
        "batch_size": recipe.data.batch_size,
        "member": member,
        "seed": recipe.seed,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _train_member(
    recipe: TeacherRecipe, rows: Rows, member: int, acc: Accelerator, progress: Progress
) -> tuple[torch.nn.Module, dict[str, Any]]:
    t = recipe.teacher
    assert t is not None
    folder = resolve_path(t.store) / fingerprint(recipe, member)
    acc.wait_for_everyone()
    if (folder / "model" / "config.json").exists():
        progress.log(f"teacher member {member}: reusing {folder}")
        return load_exported(folder / "model", rows, "teacher.store"), json.loads(
            (folder / "info.json").read_text()
        )
    seed = recipe.seed + 1000 * member
    torch.manual_seed(seed)
    model = build(t.model.arch, rows.in_shape, rows.classes, t.model.options, "teacher.model")
    y = rows.y.clone() if t.full_labels else rows.y_train.clone()
    train_rows = rows.train if t.full_labels else rows.labelled
    ctx = ClassifierContext(student=model, teacher=None, classes=rows.classes, spec=model_config(model))
    method = CrossEntropy(ctx, CEConfig())
    cfg = TrainConfig(
        steps=t.steps, lr=t.lr, weight_decay=t.weight_decay, threads=recipe.train.threads,
        deterministic=recipe.train.deterministic, max_grad_norm=None,
    )  # fmt: skip
    stream = TensorStream(rows.x, y, train_rows, recipe.data.batch_size, seed)
    progress.log(f"training teacher member {member} ({t.model.arch}, {t.steps} steps)")
    result = train(
        method=method,
        stream=stream,
        cfg=cfg,
        out_dir=folder / "train",
        seed=seed,
        progress=progress,
        accelerator=acc,
    )
    info = {
        "validation_accuracy": accuracy(model, rows.x[rows.val], rows.y[rows.val]),
        "train_seconds": result.seconds,
    }
    if acc.is_main_process:
        method.export(folder / "model")
        (folder / "info.json").write_text(json.dumps(info), encoding="utf-8")
    acc.wait_for_everyone()
    return model.eval(), info


def _graph_teacher(
    recipe: TeacherRecipe, rows: Rows, progress: Progress
) -> tuple[TeacherNet, dict[str, Any]]:
    """Full-batch GNN training on the labelled nodes, best epoch on validation; then logits for every node."""
    from distill.graphs.gnn import GCN, GraphModule, GraphSAGE, train_full_batch

    t = recipe.teacher
    assert t is not None and rows.graph is not None
    torch.manual_seed(recipe.seed)
    cls = {"gcn": GCN, "sage": GraphSAGE}[t.model.arch]
    try:
        gnn = cls(rows.x.shape[1], rows.classes, **t.model.options)
    except TypeError as err:
        raise RecipeError(f"teacher.model.options: {err}") from None
    progress.log(f"training the {t.model.arch} teacher on the graph ({t.steps} epochs)")
    info = train_full_batch(
        gnn, rows.graph, epochs=t.steps, lr=t.lr, weight_decay=t.weight_decay, seed=recipe.seed
    )
    module = GraphModule.for_graph(gnn, rows.graph).eval()
    with torch.no_grad():
        table = module(rows.x)
    return TeacherNet(table=table), {"validation_accuracy": info["val_acc"], "graph_module": module}


def make_teacher(
    recipe: TeacherRecipe, rows: Rows, acc: Accelerator, progress: Progress
) -> tuple[TeacherNet, dict[str, Any]]:
    """The teacher signal and facts about it (validation accuracy; test accuracy is measured by the family)."""
    t: ClassifierTeacherConfig | None = recipe.teacher
    assert t is not None
    if rows.graph is not None:
        return _graph_teacher(recipe, rows, progress)
    if t.path is not None:
        model = load_exported(resolve_path(t.path), rows)
        return TeacherNet([model]), {
            "validation_accuracy": accuracy(model, rows.x[rows.val], rows.y[rows.val])
        }
    members, infos = [], []
    for member in range(t.ensemble):
        model, info = _train_member(recipe, rows, member, acc, progress)
        members.append(model)
        infos.append(info)
    net = TeacherNet(members)
    return net, {"validation_accuracy": [i["validation_accuracy"] for i in infos], "members": len(members)}
