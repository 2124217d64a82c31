"""Build the student: a depth-pruned copy of the teacher, a fresh model from a config, or a pretrained one."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from distill.errors import RecipeError
from distill.models.config_facts import check_prune_fits
from distill.models.loading import LOAD_ERRORS, first_line, fresh_copy, load_model
from distill.recipe import PruneConfig, StudentConfig


def evenly_spaced_layers(total: int, keep: int) -> list[int]:
    """`keep` indices spread over `total` layers, first and last included (the ends matter most:
    the first layers build token features, the last ones shape the output distribution)."""
    check_prune_fits(keep, None, total)
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def decoder_layers(model: PreTrainedModel, field: str = "student.prune") -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM (`.model.layers`); a model without them is one line naming `field`."""
    body = model.base_model
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise RecipeError(
            f"{field}: cannot find the decoder layers of {type(model).__name__} (expected .model.layers)"
        )
    return layers


def prune_depth(teacher: PreTrainedModel, prune: PruneConfig) -> tuple[PreTrainedModel, list[int]]:
    """Copy the teacher keeping only some decoder layers; embeddings, final norm and head are copied too."""
    total = teacher.config.num_hidden_layers
    check_prune_fits(None, prune.layers, total)
    keep = (
        prune.layers if prune.layers is not None else evenly_spaced_layers(total, prune.keep_layers or total)
    )
    keep = sorted(keep)
    changes: dict[str, Any] = {"num_hidden_layers": len(keep)}
    layer_types = getattr(teacher.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == total:
        changes["layer_types"] = [layer_types[i] for i in keep]
    student = fresh_copy(teacher, **changes)
    src = teacher.state_dict()
    prefix = _layers_prefix(teacher)
    mapped: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        if key.startswith(prefix):
            idx_str, _, rest = key[len(prefix) :].partition(".")
            idx = int(idx_str)
            if idx in keep:
                mapped[f"{prefix}{keep.index(idx)}.{rest}"] = value
        else:
            mapped[key] = value
    missing, unexpected = student.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if student.config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RecipeError(
            f"student.prune: weights did not map cleanly (missing {missing[:3]}, extra {unexpected[:3]})"
        )
    student.tie_weights()
    return student, keep


def _layers_prefix(model: PreTrainedModel) -> str:
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name + "."
    raise RecipeError("student.prune: cannot locate the decoder layer list")


Calibration = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def prune_ranked(
    teacher: PreTrainedModel, prune: PruneConfig, calibration: Calibration | None, seed: int
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Depth by block importance and/or width by activation importance (Minitron), or both at random
    (the control): a plain model of the teacher's class."""
    from distill.models.importance import calibrate, random_importance, rank_blocks, top_indices
    from distill.models.width_prune import WidthTarget, prune_model

    total = teacher.config.num_hidden_layers
    check_prune_fits(prune.keep_layers, prune.layers, total)
    if prune.ranking == "random":
        importance = random_importance(teacher, seed)
    else:
        if calibration is None:
            raise RecipeError("student.prune.calibration: importance ranking needs calibration texts")
        importance = calibrate(teacher, calibration())
    if prune.layers is not None:
        keep = sorted(prune.layers)
    elif prune.keep_layers is not None and prune.depth == "importance":
        keep = rank_blocks(importance, prune.keep_layers)
    else:
        keep = evenly_spaced_layers(total, prune.keep_layers or total)
    width = prune.width.model_dump() if prune.width is not None else {}
    student = prune_model(teacher, keep, WidthTarget(**width), importance)
    info = {"init": "prune", "kept_layers": keep, "depth": prune.depth, "ranking": prune.ranking}
    if prune.width is not None and prune.width.hidden_size is not None:  # what prune_model kept
        info["kept_channels"] = [int(i) for i in top_indices(importance.embedding, prune.width.hidden_size)]
    return student, info | {f"width_{k}": v for k, v in width.items() if v is not None}


def build_student(
    cfg: StudentConfig,
    teacher: PreTrainedModel | None,
    calibration: Calibration | None = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Return the student model and a small description for the report. `calibration` yields
    (input_ids, attention_mask) batches for importance ranking; `seed` drives random ranking."""
    if cfg.init == "prune":
        assert cfg.prune is not None and teacher is not None
        info: dict[str, Any]
        if cfg.prune.width is not None or cfg.prune.depth == "importance":
            student, info = prune_ranked(teacher, cfg.prune, calibration, seed)
        else:
            student, keep = prune_depth(teacher, cfg.prune)
            info = {"init": "prune", "kept_layers": keep}
    elif cfg.init == "config":
        assert cfg.config is not None
        student = _student_from_config(cfg.config, teacher)
        info = {"init": "config"}
    else:
        assert cfg.model is not None
        student = fresh_copy_if_gguf(cfg)
        info = {"init": "pretrained", "path": cfg.model.path}
    student.train()
    if cfg.lora is not None:
        from distill.models.lora import add_lora

        info["lora"] = add_lora(student, cfg.lora)
    info["parameters"] = sum(p.numel() for p in student.parameters())
    info["layers"] = student.config.num_hidden_layers
    return student, info


def _student_from_config(changes: dict[str, Any], teacher: PreTrainedModel | None) -> PreTrainedModel:
    """A fresh model from `student.config` (over the teacher's config when there is one); a setting
    transformers rejects (unknown model_type, heads not dividing the width) is named as the field."""
    conf = {**teacher.config.to_dict(), **changes} if teacher is not None else dict(changes)
    if "model_type" not in conf:
        raise RecipeError("student.config: needs model_type (e.g. llama) when there is no teacher")
    try:
        config = AutoConfig.for_model(conf.pop("model_type"), **conf)
        return AutoModelForCausalLM.from_config(config)
    except LOAD_ERRORS + (TypeError,) as err:
        raise RecipeError(f"student.config: {first_line(err)}") from None


def fresh_copy_if_gguf(cfg: StudentConfig) -> PreTrainedModel:
    assert cfg.model is not None
    loaded = load_model(cfg.model)
    if cfg.model.gguf_file is None:
        return loaded.model
    copy = fresh_copy(loaded.model)
    copy.load_state_dict(loaded.model.state_dict())
    return copy
