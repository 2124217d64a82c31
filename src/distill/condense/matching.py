"""Surrogate objectives that make a small synthetic set behave like the real one (pure tensor functions).

- Gradient matching, DC (Zhao, Mopuri & Bilen 2021, "Dataset Condensation with Gradient Matching").
- Distribution matching, DM (Zhao & Bilen 2023, "Dataset Condensation with Distribution Matching").
- Attention matching, DataDAM (Sajedi et al. 2023, "DataDAM: Efficient Dataset Distillation with
  Attention Matching").

All functions work per class: the caller loops over classes and sums, as the papers do, because matching
class-conditional statistics is what keeps each synthetic image recognisable as its class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "attention_maps",
    "attention_matching_loss",
    "class_gradients",
    "distribution_matching_loss",
    "final_embedding_mmd",
    "gradient_distance",
    "layer_gradient_distance",
    "mmd_loss",
]

_EPS = 1e-6  # the DC reference implementation's guard in the cosine denominator


def layer_gradient_distance(g_real: Tensor, g_syn: Tensor, one_d: Literal["row", "skip"] = "row") -> Tensor:
    """DC's layer-wise distance: sum over output nodes of (1 - cosine) between gradient rows.

    Why rows and not one flattened vector: each output node (conv filter, linear unit) gets its own cosine,
    so a few large filters cannot dominate the match. A weight of shape (out, ...) is viewed as
    (out, prod(...)); a 1-D tensor (bias, norm affine) is one row (``one_d="row"``) or ignored
    (``one_d="skip"``, what the authors' code does).
    """
    if g_real.shape != g_syn.shape:
        raise ValueError(f"gradient shapes differ: {tuple(g_real.shape)} vs {tuple(g_syn.shape)}")
    if g_real.dim() <= 1:
        if one_d == "skip":
            return g_real.new_zeros(())
        a, b = g_real.reshape(1, -1), g_syn.reshape(1, -1)
    else:
        a, b = g_real.reshape(g_real.shape[0], -1), g_syn.reshape(g_syn.shape[0], -1)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + _EPS)
    return (1 - cos).sum()


def gradient_distance(
    g_real: Sequence[Tensor], g_syn: Sequence[Tensor], one_d: Literal["row", "skip"] = "row"
) -> Tensor:
    """DC's matching objective: `layer_gradient_distance` summed over layers (parameter tensors).

    Pass the real gradients detached (they are targets) and the synthetic ones from
    ``class_gradients(..., create_graph=True)`` so the distance back-propagates into the synthetic images.
    """
    if len(g_real) != len(g_syn):
        raise ValueError(f"{len(g_real)} real gradients vs {len(g_syn)} synthetic ones")
    if not g_real:
        raise ValueError("no gradients to match")
    total = g_syn[0].new_zeros(())
    for a, b in zip(g_real, g_syn, strict=True):
        total = total + layer_gradient_distance(a, b, one_d)
    return total


def class_gradients(
    model: nn.Module,
    params: Mapping[str, Tensor] | None,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    create_graph: bool = False,
    buffers: Mapping[str, Tensor | None] | None = None,
) -> list[Tensor]:
    """Gradients of ``loss_fn(model(x), y)`` w.r.t. ``params`` (in their order), computed functionally.

    ``params=None`` uses the module's own parameters. ``create_graph=True`` for the synthetic side keeps
    the graph so a distance on these gradients reaches ``x``; the real side needs none (cheaper).
    ``buffers`` overrides module buffers; map BatchNorm's running stats to None (see
    ``trajectory.stateless_buffers``) to use batch statistics without mutating the model.
    """
    if params is None:
        params = dict(model.named_parameters())
    names = list(params)
    leaves = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
    state: tuple[Mapping[str, Tensor | None], ...] = (leaves,) if buffers is None else (leaves, buffers)
    loss = loss_fn(functional_call(model, cast(Any, state), (x,)), y)
    grads = torch.autograd.grad(
        loss, [leaves[k] for k in names], create_graph=create_graph, allow_unused=True
    )
    return [torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(names, grads, strict=True)]


def distribution_matching_loss(emb_real: Tensor, emb_syn: Tensor) -> Tensor:
    """DM: squared L2 distance between the mean embeddings of one class (real vs synthetic).

    Why means: DM matches the first moment in many randomly initialised embedding spaces, which is an
    MMD with a linear kernel -- no bi-level optimisation, so it scales to large IPC cheaply.
    """
    if emb_real.shape[1:] != emb_syn.shape[1:]:
        raise ValueError(f"embedding shapes differ: {tuple(emb_real.shape)} vs {tuple(emb_syn.shape)}")
    diff = emb_real.flatten(1).mean(0) - emb_syn.flatten(1).mean(0)
    return (diff * diff).sum()


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return d.clamp_min(0)


def mmd_loss(
    a: Tensor, b: Tensor, kernel: Literal["linear", "rbf"] = "linear", sigma: float | None = None
) -> Tensor:
    """Biased squared MMD between samples ``a`` (n, d) and ``b`` (m, d).

    ``linear`` equals `distribution_matching_loss`. ``rbf`` uses k(u, v) = exp(-|u - v|^2 / (2 sigma^2));
    ``sigma=None`` takes the median pairwise distance of the pooled samples (detached), the usual
    heuristic, so the kernel is neither flat nor spiky whatever the embedding scale.
    """
    a, b = a.flatten(1), b.flatten(1)
    if kernel == "linear":
        return distribution_matching_loss(a, b)
    if kernel != "rbf":
        raise ValueError(f"unknown kernel '{kernel}' (known: linear, rbf)")
    if sigma is None:
        pooled = torch.cat([a, b]).detach()
        d = _sq_dists(pooled, pooled)
        off = d[~torch.eye(len(pooled), dtype=torch.bool, device=d.device)]
        med = off.median().sqrt() if off.numel() else d.new_ones(())
        scale = 2 * med.clamp_min(1e-12) ** 2
    else:
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0 (got {sigma})")
        scale = a.new_tensor(2 * sigma**2)
    kaa = torch.exp(-_sq_dists(a, a) / scale).mean()
    kbb = torch.exp(-_sq_dists(b, b) / scale).mean()
    kab = torch.exp(-_sq_dists(a, b) / scale).mean()
    return kaa + kbb - 2 * kab


def attention_maps(feats: Tensor, p: float = 4) -> Tensor:
    """DataDAM's spatial attention: mean over channels of |f|^p, flattened and L2-normalised per sample.

    ``feats`` is (B, C, *spatial) -> (B, prod(spatial)). The power p > 1 emphasises the most active
    locations; normalising makes the map about *where* the network looks, not how strongly it fires.
    For token features (B, T, D) pass ``feats.transpose(1, 2)``.
    """
    if feats.dim() < 3:
        raise ValueError(f"attention maps need (B, C, *spatial) features (got shape {tuple(feats.shape)})")
    amap = feats.abs().pow(p).mean(1).flatten(1)
    return amap / amap.norm(dim=1, keepdim=True).clamp_min(1e-12)


def attention_matching_loss(
    real_feats: Sequence[Tensor], syn_feats: Sequence[Tensor], p: float = 4
) -> Tensor:
    """DataDAM's spatial attention matching (SAM) term for one class.

    Per layer: batch-averaged attention maps of real and synthetic features, squared L2 between them;
    summed over layers. Matching intermediate attention adds the spatial information a final-embedding
    match (`final_embedding_mmd`) misses.
    """
    if len(real_feats) != len(syn_feats):
        raise ValueError(f"{len(real_feats)} real feature maps vs {len(syn_feats)} synthetic ones")
    if not real_feats:
        raise ValueError("no feature maps to match")
    total = syn_feats[0].new_zeros(())
    for fr, fs in zip(real_feats, syn_feats, strict=True):
        if fr.shape[1:] != fs.shape[1:]:
            raise ValueError(f"feature shapes differ: {tuple(fr.shape)} vs {tuple(fs.shape)}")
        diff = attention_maps(fr, p).mean(0) - attention_maps(fs, p).mean(0)
        total = total + (diff * diff).sum()
    return total


def final_embedding_mmd(
    emb_real: Tensor, emb_syn: Tensor, kernel: Literal["linear", "rbf"] = "linear", sigma: float | None = None
) -> Tensor:
    """DataDAM's L_MMD term on the last-layer embedding (linear kernel in the paper: mean-embedding gap).

    Exposed separately so the caller weights it against `attention_matching_loss` (the paper's lambda).
    """
    return mmd_loss(emb_real, emb_syn, kernel=kernel, sigma=sigma)
