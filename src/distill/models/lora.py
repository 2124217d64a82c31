"""LoRA students through peft: adapters are injected into the student in place (it stays the same
transformers model, so the body forward, the fused LM head and evaluation need no special path), only
the adapters train, and export merges them into plain weights or writes a peft adapter folder."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.configs.compress import LoraConfig
from distill.errors import RecipeError


def _peft() -> Any:
    try:
        import peft
    except ImportError:  # pragma: no cover - peft is a dependency; this is for broken installs
        raise RecipeError("student.lora: needs the `peft` package (pip install peft)") from None
    return peft


def _peft_config(cfg: LoraConfig) -> Any:
    return _peft().LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets)
    )


def add_lora(model: nn.Module, cfg: LoraConfig) -> dict[str, int]:
    """Inject adapters on every Linear whose name ends with a target; freeze everything else. Returns
    the trainable and total parameter counts."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    for target in cfg.targets:
        if not any(n == target or n.endswith("." + target) for n, _ in model.named_modules()):
            raise RecipeError(
                f"student.lora.targets: the student has no module named {target!r} (its linear layers: {', '.join(linear)})"
            )
    _peft().inject_adapter_in_model(_peft_config(cfg), model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return {
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def _strip(model: nn.Module, merge: bool) -> nn.Module:
    """A copy with every LoRA layer replaced by its base layer, merged into it or dropped."""
    from peft.tuners.lora import LoraLayer

    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, LoraLayer):
            if merge:
                module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, child, module.get_base_layer())
    for param in out.parameters():
        param.requires_grad_(True)
    return out


def merged_copy(model: nn.Module) -> nn.Module:
    """The student as plain weights, W + (alpha / r) B A in every adapted layer."""
    return _strip(model, merge=True)


def base_copy(model: nn.Module) -> nn.Module:
    """The student without its adapters (what an adapter folder is applied to)."""
    return _strip(model, merge=False)


def save_adapter(model: nn.Module, cfg: LoraConfig, folder: Path) -> None:
    """A peft adapter folder (`adapter_config.json`, `adapter_model.safetensors`) that
    `peft.PeftModel.from_pretrained(base, folder)` applies to the exported base model."""
    from safetensors.torch import save_file

    peft = _peft()
    folder.mkdir(parents=True, exist_ok=True)
    # peft names adapter tensors from the wrapper it would have put around the model
    state = {
        f"base_model.model.{k}": v.detach().contiguous()
        for k, v in peft.get_peft_model_state_dict(model).items()
    }
    save_file(state, str(folder / "adapter_model.safetensors"))
    _peft_config(cfg).save_pretrained(str(folder))


def trainable_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in an optimizer's state tensors (AdamW: two moments per trainable parameter)."""
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )
