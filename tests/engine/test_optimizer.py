"""The engine's AdamW: the fused kernel where one exists, the same update as the per-tensor version."""

from __future__ import annotations

import torch

from distill.engine.optim import group_settings, make_adamw
from distill.recipe import TrainConfig


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(7, 5, generator=g)),
        torch.nn.Parameter(torch.randn(3, generator=g)),
    ]


def test_fused_on_cpu_and_same_update_as_per_tensor() -> None:
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused_params, plain_params = _params(0), _params(0)
    fused = make_adamw(fused_params, group_settings(cfg, "main"))
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW(plain_params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    for step in range(5):
        grads = _params(100 + step)
        for ps in (fused_params, plain_params):
            for p, gr in zip(ps, grads, strict=True):
                p.grad = gr.detach().clone()
        fused.step()
        plain.step()
    for a, b in zip(fused_params, plain_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_group_settings_override_train_defaults() -> None:
    cfg = TrainConfig.model_validate(
        {"lr": 1e-3, "optimizers": {"critic": {"lr": 5e-4, "max_grad_norm": 3.0}}}
    )
    assert (
        group_settings(cfg, "critic")["lr"] == 5e-4 and group_settings(cfg, "critic")["max_grad_norm"] == 3.0
    )
    assert group_settings(cfg, "main")["lr"] == 1e-3 and group_settings(cfg, "main")["max_grad_norm"] == 1.0
