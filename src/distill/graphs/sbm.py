"""A node-classification graph and a synthetic generator for it.

The stochastic block model is the test bed for GNN-to-MLP distillation: node features alone carry a weak
class signal, while edges (mostly intra-class, controlled by `homophily`) let a GNN average neighbours and
do much better. That gap is exactly what a distilled MLP student tries to close (GLNN, Zhang et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Graph:
    """One graph for transductive node classification.

    `edge_index` is undirected: both directions are stored, with no self loops and no duplicates.
    `train_idx`, `val_idx` and `test_idx` are disjoint; the test split is never used for model selection.
    """

    x: Tensor  # (N, F) float32
    y: Tensor  # (N,) int64
    edge_index: Tensor  # (2, E) int64
    classes: int
    train_idx: Tensor
    val_idx: Tensor
    test_idx: Tensor
    name: str = "graph"

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_edges(self) -> int:
        """Undirected edges (each stored twice in `edge_index`)."""
        return int(self.edge_index.shape[1]) // 2

    def to(self, device: torch.device | str) -> Graph:
        """A copy with every tensor on `device`."""
        return Graph(
            x=self.x.to(device),
            y=self.y.to(device),
            edge_index=self.edge_index.to(device),
            classes=self.classes,
            train_idx=self.train_idx.to(device),
            val_idx=self.val_idx.to(device),
            test_idx=self.test_idx.to(device),
            name=self.name,
        )


def undirected_edges(pairs: Tensor, num_nodes: int) -> Tensor:
    """Canonical undirected `edge_index` from any (2, M) pairs: self loops dropped, duplicates merged,
    both directions stored, sorted by (source, target) so the result is independent of input order."""
    if pairs.numel() == 0:
        return torch.empty(2, 0, dtype=torch.long)
    src, dst = pairs[0].long(), pairs[1].long()
    keep = src != dst
    src, dst = src[keep], dst[keep]
    both_src = torch.cat([src, dst])
    both_dst = torch.cat([dst, src])
    keys = torch.unique(both_src * num_nodes + both_dst)  # sorted
    return torch.stack([keys // num_nodes, keys % num_nodes])


def make_splits(
    y: Tensor, classes: int, train_per_class: int = 20, val_fraction: float = 0.2, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Planetoid/GLNN-style splits: `train_per_class` labelled nodes per class, then `val_fraction` of the
    remaining nodes for validation and the rest for test. Deterministic by `seed`; indices are sorted.

    A class with too few nodes gives all but one of them to training (so it still appears in val/test
    when possible); raises ValueError when `train_per_class` < 1 or `val_fraction` is outside [0, 1).
    """
    if train_per_class < 1:
        raise ValueError(f"train_per_class must be >= 1, got {train_per_class}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    gen = torch.Generator().manual_seed(seed)
    y = y.cpu()
    train_parts = []
    for c in range(classes):
        members = torch.nonzero(y == c).flatten()
        if members.numel() == 0:
            continue
        members = members[torch.randperm(members.numel(), generator=gen)]
        take = min(train_per_class, max(members.numel() - 1, 1))
        train_parts.append(members[:take])
    train = torch.cat(train_parts) if train_parts else torch.empty(0, dtype=torch.long)
    is_train = torch.zeros(y.numel(), dtype=torch.bool)
    is_train[train] = True
    rest = torch.nonzero(~is_train).flatten()
    rest = rest[torch.randperm(rest.numel(), generator=gen)]
    n_val = int(round(val_fraction * rest.numel()))
    return train.sort().values, rest[:n_val].sort().values, rest[n_val:].sort().values


def stochastic_block_model(
    nodes: int = 2000,
    classes: int = 5,
    features: int = 32,
    avg_degree: float = 10.0,
    homophily: float = 0.8,
    feature_signal: float = 1.0,
    train_per_class: int = 20,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Graph:
    """A synthetic homophilous graph where structure matters.

    Classes are balanced. Each class gets a random unit-norm feature mean; a node's features are
    `feature_signal * mean[class] + N(0, I)`, so `feature_signal` is the mean's size in noise standard
    deviations. With the defaults an MLP trained on the 100 labelled nodes is weak but above chance (~0.35
    test accuracy for 5 classes), a 2-layer GCN averaging ~`avg_degree` mostly same-class neighbours
    reaches ~0.97, and an MLP distilled from that GCN's soft labels on all nodes lands in between (~0.5-0.65):
    features alone cannot carry everything the graph adds, which leaves room to compare methods.
    Edges: each undirected edge picks a uniform random node, then with probability `homophily` a random
    other node of the same class, else a random node of a different class; duplicates are redrawn until
    `round(nodes * avg_degree / 2)` distinct edges exist, so the mean degree is `avg_degree` and the
    expected intra-class fraction is `homophily`. Fully deterministic by `seed`.
    """
    if nodes < 2 or classes < 1 or features < 1:
        raise ValueError(f"need nodes >= 2, classes >= 1, features >= 1; got {nodes}, {classes}, {features}")
    if classes > nodes:
        raise ValueError(f"classes ({classes}) cannot exceed nodes ({nodes})")
    if not 0.0 <= homophily <= 1.0:
        raise ValueError(f"homophily must be in [0, 1], got {homophily}")
    if classes == 1 and homophily < 1.0:
        raise ValueError("with one class every edge is intra-class; use homophily=1.0")
    if avg_degree < 0:
        raise ValueError(f"avg_degree must be >= 0, got {avg_degree}")
    gen = torch.Generator().manual_seed(seed)

    y = (torch.arange(nodes) % classes)[torch.randperm(nodes, generator=gen)]
    means = torch.randn(classes, features, generator=gen)
    means = means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)
    x = feature_signal * means[y] + torch.randn(nodes, features, generator=gen)

    target = int(round(nodes * avg_degree / 2))
    sizes = torch.bincount(y, minlength=classes)
    max_possible = int(((sizes * (sizes - 1)) // 2).sum()) if homophily == 1.0 else nodes * (nodes - 1) // 2
    if target > max_possible:
        raise ValueError(f"avg_degree {avg_degree} needs {target} edges but at most {max_possible} fit")
    edges = _sample_edges(y, classes, sizes, homophily, target, gen)

    train_idx, val_idx, test_idx = make_splits(y, classes, train_per_class, val_fraction, seed)
    return Graph(
        x=x.float(),
        y=y.long(),
        edge_index=edges,
        classes=classes,
        train_idx=train_idx,
        val_idx=val_idx,
        test_idx=test_idx,
        name=f"sbm-n{nodes}-c{classes}-h{homophily:g}-s{seed}",
    )


def _sample_edges(
    y: Tensor, classes: int, sizes: Tensor, homophily: float, target: int, gen: torch.Generator
) -> Tensor:
    """Draw edges in batches until `target` distinct undirected edges exist (extra draws are trimmed in
    draw order, so the result does not depend on batch boundaries beyond the seed)."""
    nodes = y.numel()
    order = torch.argsort(y, stable=True)  # node ids grouped by class
    starts = torch.cumsum(sizes, 0) - sizes
    seen: set[int] = set()
    kept_src: list[int] = []
    kept_dst: list[int] = []
    count = 0
    for _ in range(1000):
        if count >= target:
            break
        batch = max(2 * (target - count), 64)
        u = torch.randint(nodes, (batch,), generator=gen)
        cu = y[u]
        same = torch.rand(batch, generator=gen) < homophily
        # same class: uniform over the class block
        r_same = (torch.rand(batch, generator=gen) * sizes[cu]).long().clamp_max(sizes[cu] - 1)
        v_same = order[starts[cu] + r_same]
        # other class: uniform over the N - size[c] nodes outside the block (skip over it)
        outside = nodes - sizes[cu]
        r_diff = (torch.rand(batch, generator=gen) * outside).long().clamp_max((outside - 1).clamp_min(0))
        r_diff = torch.where(r_diff >= starts[cu], r_diff + sizes[cu], r_diff)
        v_diff = order[r_diff.clamp_max(nodes - 1)]
        v = torch.where(same, v_same, v_diff)
        lo, hi = torch.minimum(u, v), torch.maximum(u, v)
        valid = lo != hi
        if classes > 1:
            valid &= same | (outside > 0)
        for a, b in zip(lo[valid].tolist(), hi[valid].tolist(), strict=True):
            key = a * nodes + b
            if key in seen:
                continue
            seen.add(key)
            kept_src.append(a)
            kept_dst.append(b)
            count += 1
            if count >= target:
                break
    if count < target:
        raise ValueError(f"could not draw {target} distinct edges (got {count}); lower avg_degree")
    return undirected_edges(torch.tensor([kept_src, kept_dst], dtype=torch.long).view(2, -1), nodes)


def measured_homophily(graph: Graph) -> float:
    """Edge homophily: the fraction of edges joining two nodes of the same class (nan with no edges)."""
    if graph.edge_index.shape[1] == 0:
        return float("nan")
    src, dst = graph.edge_index
    return float((graph.y[src] == graph.y[dst]).float().mean())
