"""The diffusion family's teacher: trained once by the run with `denoise` through the same engine and
stored by a fingerprint of data and teacher settings (every method, seed and resumed run reuses it), or
loaded from a folder this family saved, checked against the recipe's noise path and data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from distill.classifier.batches import TensorStream
from distill.configs.diffusion import DenoiseConfig
from distill.diffusion.data import DiffusionData
from distill.diffusion.diffusers_teacher import is_diffusers_folder, load_diffusers_teacher, scheduler_kind
from distill.diffusion.models import Denoiser, DigitsUNet, ToyMLP
from distill.diffusion.paths import NoisePath
from distill.diffusion.sample_command import load_model_folder
from distill.engine.trainer import train
from distill.errors import InputError, RecipeError
from distill.methods.diffusion.base import NOISE_PATH_FILE, DiffusionContext, frozen_copy
from distill.methods.diffusion.denoise import Denoise
from distill.paths import resolve_path
from distill.progress import Progress
from distill.recipe_base import TrainConfig
from distill.recipe_diffusion import DiffusionRecipe


def build_net(data: DiffusionData, options: dict[str, Any], guidance: bool, field: str) -> torch.nn.Module:
    """The family's architecture for the data: ToyMLP for vectors, DigitsUNet for images."""
    try:
        if len(data.shape) == 1:
            return ToyMLP(dim=data.shape[0], classes=data.classes, guidance_embed=guidance, **options)
        return DigitsUNet(in_channels=data.shape[0], classes=data.classes, guidance_embed=guidance, **options)
    except TypeError as err:
        raise RecipeError(f"{field}: {err}") from None


def noise_path(recipe: DiffusionRecipe, data: DiffusionData) -> NoisePath:
    """EDM's sigma_data is the data's own standard deviation."""
    return NoisePath(kind=recipe.teacher.objective, sigma_data=float(data.x.std()))


def fingerprint(recipe: DiffusionRecipe) -> str:
    t = recipe.teacher
    what = {
        "data": recipe.data.model_dump(mode="json"),
        "teacher": t.model_dump(mode="json", exclude={"store", "path", "sampler", "guidance"}),
        "seed": recipe.seed,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def load_saved(folder: Path, data: DiffusionData, path: NoisePath, field: str) -> Denoiser:
    """A folder saved by this family (read as `distill sample` reads it): its noise path must be the
    recipe's, its shape and classes the data's."""
    try:
        saved = load_model_folder(folder)
    except InputError as err:
        raise InputError(f"{field}: {err}") from None
    kind = saved.denoiser.path.kind
    if kind != path.kind:
        raise InputError(
            f"teacher.objective: the model in {folder} was trained on the {kind!r} noise path, not {path.kind!r}"
        )
    if list(saved.shape) != list(data.shape) or saved.classes != data.classes:
        raise InputError(
            f"{field}: {folder} makes samples of shape {list(saved.shape)} with {saved.classes} "
            f"classes; the data has {list(data.shape)} and {data.classes}"
        )
    return frozen_copy(saved.denoiser)  # type: ignore[return-value]


def _from_diffusers(folder: Path, path: NoisePath) -> Denoiser:
    kind = scheduler_kind(folder)
    if kind is not None and kind != path.kind:
        raise InputError(
            f"teacher.objective: the scheduler in {folder} belongs to the {kind!r} noise path, not {path.kind!r}"
        )
    net, loaded = load_diffusers_teacher(folder, "teacher.path")
    return frozen_copy(Denoiser(net, loaded))  # type: ignore[return-value]


def make_teacher(
    recipe: DiffusionRecipe, data: DiffusionData, acc: Accelerator, progress: Progress
) -> tuple[Denoiser, dict[str, Any]]:
    """The frozen teacher (EMA weights) and facts about its training."""
    t = recipe.teacher
    path = noise_path(recipe, data)
    if t.path is not None:
        folder = resolve_path(t.path)
        if is_diffusers_folder(folder):
            return _from_diffusers(folder, path), {"source": t.path}
        return load_saved(folder, data, path, "teacher.path"), {"source": t.path}
    folder = resolve_path(t.store) / fingerprint(recipe)
    acc.wait_for_everyone()
    if (folder / "model" / NOISE_PATH_FILE).exists():
        progress.log(f"teacher: reusing {folder}")
        info = json.loads((folder / "info.json").read_text())
        return load_saved(folder / "model", data, path, "teacher.store"), info
    torch.manual_seed(recipe.seed)

    def make(init: str, guidance: bool) -> Denoiser:
        return Denoiser(build_net(data, t.model, guidance, "teacher.model"), path)

    ctx = DiffusionContext(path=path, shape=data.shape, classes=data.classes, teacher=None, guidance=1.0,
                           make_student=make)  # fmt: skip
    method = Denoise(ctx, DenoiseConfig(ema=t.ema, label_dropout=t.label_dropout, steps=t.sampler.steps))
    cfg = TrainConfig(steps=t.steps, lr=t.lr, threads=recipe.train.threads, max_grad_norm=1.0,
                      deterministic=recipe.train.deterministic, warmup_steps=min(100, t.steps // 10))  # fmt: skip
    stream = TensorStream(data.x, data.y, torch.arange(len(data.x)), recipe.data.batch_size, recipe.seed)
    progress.log(f"training the teacher ({t.objective} path, {t.steps} steps)")
    result = train(method=method, stream=stream, cfg=cfg, out_dir=folder / "train", seed=recipe.seed,
                   progress=progress, accelerator=acc)  # fmt: skip
    tail = [h["mse"] for h in result.history[-50:]]
    info = {"train_seconds": result.seconds, "final_mse": sum(tail) / max(1, len(tail)), "steps": t.steps}
    if acc.is_main_process:
        method.export(folder / "model")
        (folder / "info.json").write_text(json.dumps(info), encoding="utf-8")
    acc.wait_for_everyone()
    return frozen_copy(method.eval_model()), info  # type: ignore[return-value]
