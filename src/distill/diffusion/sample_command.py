"""`distill sample`: samples from a model folder the diffusion family saved (a teacher store's `model/`,
a run's `student/`), without the recipe that made it. The folder's `noise_path.json` holds all that
sampling needs (noise path, sampler, steps, classes, shape), so a distilled student can be used and
looked at on its own; options override the folder's sampler and steps to compare step counts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from distill.diffusion.models import Denoiser, DigitsUNet, ToyMLP, guided_x0
from distill.diffusion.paths import PATH_KINDS, NoisePath
from distill.diffusion.sampling import LabelledX0Fn, SamplerKind, generate
from distill.errors import InputError
from distill.methods.diffusion.base import NOISE_PATH_FILE

SAMPLERS: tuple[str, ...] = ("ode", "heun", "consistency")
ARRAY_SUFFIXES = (".npy", ".safetensors")
NETS: dict[str, Any] = {"ToyMLP": ToyMLP, "DigitsUNet": DigitsUNet}


@dataclass(frozen=True)
class SavedModel:
    denoiser: Denoiser
    sampler: str
    steps: int
    classes: int  # 0: unconditional
    shape: tuple[int, ...]
    guidance_input: bool  # a guidance-distilled student: the scale is an input, not two passes
    eval_scale: float | None  # the scale such a student was evaluated at (its method.json)


def _read_json(path: Path, folder: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(
            f"{folder}: no {path.name} here; give a model folder the diffusion family saved "
            "(a teacher store's model/ or a run's student/)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def load_model_folder(folder: Path) -> SavedModel:
    """The Denoiser of `folder` on its own noise path, with the facts sampling needs."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    facts = _read_json(folder / NOISE_PATH_FILE, folder)
    config = _read_json(folder / "config.json", folder)
    cls = NETS.get(str(config.get("_class_name", "")))
    if cls is None:
        raise InputError(f"{folder}: holds a {config.get('_class_name')!r}, not a ToyMLP or DigitsUNet")
    try:
        described = dict(facts["path"])
        if described.get("kind") not in PATH_KINDS:
            raise ValueError(f"unknown noise path {described.get('kind')!r}")
        path = NoisePath(**described)
        sampler, steps = str(facts["sampler"]), int(facts["steps"])
        classes, shape = int(facts["classes"]), tuple(int(s) for s in facts["shape"])
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{folder / NOISE_PATH_FILE}: malformed ({err})") from None
    try:
        net = cls.from_pretrained(str(folder))
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f"{folder}: cannot load the model: {str(err).splitlines()[0]}") from None
    method = folder / "method.json"
    scale = _read_json(method, folder).get("eval_scale") if method.exists() else None
    return SavedModel(
        denoiser=Denoiser(net, path).eval(),
        sampler=sampler,
        steps=steps,
        classes=classes,
        shape=shape,
        guidance_input=bool(getattr(net.config, "guidance_embed", False)),
        eval_scale=float(scale) if scale is not None else None,
    )


def x0_function(model: SavedModel, scale: float) -> LabelledX0Fn:
    """A guidance-distilled student reads the scale; a conditional model mixes two passes (CFG)."""
    den = model.denoiser
    if model.guidance_input:
        return lambda x, t, lab: den.x0(x, t, lab, torch.full((x.shape[0],), scale, device=x.device))
    return lambda x, t, lab: guided_x0(den, x, t, lab, scale)


def check_options(
    model: SavedModel, steps: int, count: int, label: int | None, guidance: float | None, sampler: str
) -> None:
    if steps < 1:
        raise InputError(f"--steps: must be at least 1, got {steps}")
    if count < 1:
        raise InputError(f"--count: must be at least 1, got {count}")
    if sampler not in SAMPLERS:
        raise InputError(f"--sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
    if model.classes == 0 and label is not None:
        raise InputError(f"--label: the model is unconditional (no classes); it takes no label, got {label}")
    if label is not None and not 0 <= label < model.classes:
        raise InputError(f"--label: {label} is out of range for a model with {model.classes} classes")
    if guidance is not None:
        if model.classes == 0:
            raise InputError("--guidance: the model is unconditional; guidance needs class labels")
        if guidance < 0:
            raise InputError(f"--guidance: must be at least 0, got {guidance}")


def sample_folder(
    folder: Path,
    out: Path,
    *,
    steps: int | None = None,
    count: int = 16,
    label: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    sampler: str | None = None,
) -> str:
    """Draw `count` samples from the model in `folder`, write them to `out`; return what was written."""
    model = load_model_folder(folder)
    steps = model.steps if steps is None else steps
    sampler = model.sampler if sampler is None else sampler
    check_options(model, steps, count, label, guidance, sampler)
    check_output(out, model.shape)
    labels: torch.Tensor | None = None
    if model.classes > 0:
        labels = torch.full((count,), label) if label is not None else torch.arange(count) % model.classes
    scale = guidance if guidance is not None else (model.eval_scale if model.eval_scale is not None else 1.0)
    samples = generate(x0_function(model, scale), model.denoiser.path, model.shape, count, steps,
                       cast(SamplerKind, sampler), seed, labels)  # fmt: skip
    how = f"{sampler}, {steps} step{'s' if steps > 1 else ''}"
    write_samples(samples, labels, out, how)
    if labels is not None:
        how += f", {f'class {label}' if label is not None else 'classes in turn'}, guidance {scale:g}"
    return f"wrote {count} samples ({how}) to {out}"


def check_output(out: Path, shape: tuple[int, ...]) -> None:
    """Refuse an output the samples cannot be written as, before sampling."""
    suffix = out.suffix.lower()
    images = len(shape) == 3
    if suffix == ".png" and shape != (2,):
        raise InputError(
            f"--out: a .png file is a scatter plot of 2-D samples; these have shape {list(shape)}: "
            + ("give a folder (one PNG per sample) or " if images else "give ")
            + "a .npy or .safetensors file"
        )
    if suffix not in (*ARRAY_SUFFIXES, ".png") and not images:
        raise InputError(
            f"--out: {out.name!r}: write samples of shape {list(shape)} to a .npy, .safetensors"
            + (" or .png (scatter) file" if shape == (2,) else " file")
        )
    if images and suffix not in ARRAY_SUFFIXES and shape[0] not in (1, 3):
        raise InputError(f"--out: images with {shape[0]} channels cannot be PNG files; give a .npy file")


def write_samples(samples: torch.Tensor, labels: torch.Tensor | None, out: Path, title: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    arr = samples.detach().float().cpu()
    if suffix == ".npy":
        np.save(out, arr.numpy())
        return
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = {"samples": arr.contiguous()}
        if labels is not None:
            tensors["labels"] = labels.contiguous()
        save_file(tensors, str(out))
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if suffix == ".png":  # 2-D points
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(arr[:, 0].numpy(), arr[:, 1].numpy(), s=2, alpha=0.6)
        ax.set_aspect("equal")
        ax.set_title(f"{len(arr)} samples, {title}", fontsize=9)
        fig.savefig(out, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return
    out.mkdir(parents=True, exist_ok=True)
    pixels = ((arr + 1) / 2).clamp(0, 1).numpy()  # the family's images live in [-1, 1]
    for i, img in enumerate(pixels):
        name = f"{i:05d}" + (f"_label{int(labels[i])}" if labels is not None else "") + ".png"
        if img.shape[0] == 1:
            plt.imsave(out / name, img[0], cmap="gray", vmin=0.0, vmax=1.0)
        else:
            plt.imsave(out / name, img.transpose(1, 2, 0))
