"""GNN teachers in plain torch (sparse matmul, no PyTorch Geometric) for GNN-to-MLP distillation.

GLNN (Zhang et al. 2022) distils a trained GNN's soft labels into an MLP that needs no graph at
inference. `GCN` and `GraphSAGE` are the usual teachers; `GraphModule` binds one to a graph so it looks
like a plain classifier over all nodes; `train_full_batch` trains it transductively. `structure_codes`
and `code_soft_labels` give a simplified, VQGraph-flavoured (Yang et al. 2024) structure token per node.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.graphs.sbm import Graph


def _dedupe(edge_index: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
    """Distinct (row, col) pairs; duplicates would otherwise be summed into weight-2 edges."""
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValueError(f"edge_index has node ids outside [0, {num_nodes})")
    keys = torch.unique(edge_index[0].long() * num_nodes + edge_index[1].long())
    return keys // num_nodes, keys % num_nodes


def normalized_adjacency(edge_index: Tensor, num_nodes: int, add_self_loops: bool = True) -> Tensor:
    """GCN propagation matrix D^-1/2 (A + I) D^-1/2 (Kipf & Welling), sparse COO, float32, coalesced.

    `edge_index` should already be symmetric; existing self loops are kept once (not doubled). Nodes of
    degree zero (only possible without self loops) get an all-zero row.
    """
    row, col = _dedupe(edge_index, num_nodes)
    if add_self_loops:
        loops = torch.arange(num_nodes, device=row.device)
        off = row != col
        row = torch.cat([row[off], loops])
        col = torch.cat([col[off], loops])
    deg = torch.zeros(num_nodes, dtype=torch.float64, device=row.device)
    deg.index_add_(0, row, torch.ones_like(row, dtype=torch.float64))
    inv_sqrt = torch.where(deg > 0, deg.clamp_min(1e-300).rsqrt(), torch.zeros_like(deg))
    values = (inv_sqrt[row] * inv_sqrt[col]).float()
    adj = torch.sparse_coo_tensor(
        torch.stack([row, col]), values, (num_nodes, num_nodes), check_invariants=False
    )
    return adj.coalesce()


def mean_adjacency(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Row-normalised D^-1 A (no self loops): `adj @ h` is the mean of each node's neighbours, as in
    GraphSAGE's mean aggregator. Isolated nodes get an all-zero row (their neighbour mean is zero)."""
    row, col = _dedupe(edge_index, num_nodes)
    off = row != col
    row, col = row[off], col[off]
    deg = torch.zeros(num_nodes, dtype=torch.float32, device=row.device)
    deg.index_add_(0, row, torch.ones_like(row, dtype=torch.float32))
    values = 1.0 / deg[row]
    adj = torch.sparse_coo_tensor(
        torch.stack([row, col]), values, (num_nodes, num_nodes), check_invariants=False
    )
    return adj.coalesce()


class GNN(nn.Module):
    """Shared shape of the teachers: `hidden(x, adj)` is the last hidden representation (what VQGraph-style
    structure codes cluster), `forward(x, adj)` the logits; `adjacency` builds the matrix `adj` expected."""

    config: dict[str, Any]

    def __init__(self, in_features: int, classes: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.config = {
            "in_features": in_features,
            "classes": classes,
            "hidden": hidden,
            "layers": layers,
            "dropout": dropout,
        }
        self.dropout = dropout
        self.dims = [in_features] + [hidden] * (layers - 1) + [classes]

    @staticmethod
    def adjacency(edge_index: Tensor, num_nodes: int) -> Tensor:
        raise NotImplementedError

    def layer(self, i: int, h: Tensor, adj: Tensor) -> Tensor:
        raise NotImplementedError

    def hidden(self, x: Tensor, adj: Tensor) -> Tensor:
        """Input to the last layer: all but the final propagation (the raw features when layers == 1)."""
        h = x
        for i in range(len(self.dims) - 2):
            h = F.dropout(h, self.dropout, self.training)
            h = F.relu(self.layer(i, h, adj))
        return h

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        h = F.dropout(self.hidden(x, adj), self.dropout, self.training)
        return self.layer(len(self.dims) - 2, h, adj)


class GCN(GNN):
    """Kipf & Welling GCN: each layer is `adj @ (h W)` with the symmetric normalised adjacency."""

    def __init__(
        self, in_features: int, classes: int, hidden: int = 64, layers: int = 2, dropout: float = 0.5
    ) -> None:
        super().__init__(in_features, classes, hidden, layers, dropout)
        self.lins = nn.ModuleList(nn.Linear(a, b) for a, b in zip(self.dims[:-1], self.dims[1:], strict=True))

    @staticmethod
    def adjacency(edge_index: Tensor, num_nodes: int) -> Tensor:
        return normalized_adjacency(edge_index, num_nodes, add_self_loops=True)

    def layer(self, i: int, h: Tensor, adj: Tensor) -> Tensor:
        lin = cast(nn.Linear, self.lins[i])
        # propagate after the bias-free product, add the bias once (as in the reference GCN)
        out = torch.sparse.mm(adj, h @ lin.weight.t())
        return out + lin.bias if lin.bias is not None else out


class GraphSAGE(GNN):
    """GraphSAGE with the mean aggregator: each layer is `h W_self + mean_neighbours(h) W_neigh`."""

    def __init__(
        self, in_features: int, classes: int, hidden: int = 64, layers: int = 2, dropout: float = 0.5
    ) -> None:
        super().__init__(in_features, classes, hidden, layers, dropout)
        pairs = list(zip(self.dims[:-1], self.dims[1:], strict=True))
        self.self_lins = nn.ModuleList(nn.Linear(a, b) for a, b in pairs)
        self.neigh_lins = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in pairs)

    @staticmethod
    def adjacency(edge_index: Tensor, num_nodes: int) -> Tensor:
        return mean_adjacency(edge_index, num_nodes)

    def layer(self, i: int, h: Tensor, adj: Tensor) -> Tensor:
        return self.self_lins[i](h) + self.neigh_lins[i](torch.sparse.mm(adj, h))


class GraphModule(nn.Module):
    """A GNN bound to one graph's adjacency, so `forward(x)` looks like a plain classifier on all nodes
    (what a distillation engine expects of a teacher). `x` must be the full (N, F) node feature matrix:
    message passing needs every node, so a row subset is refused rather than silently mis-propagated.
    The adjacency is a non-persistent buffer: it follows `.to(device)` but stays out of the state dict.
    """

    adj: Tensor

    def __init__(self, gnn: GNN, adj: Tensor) -> None:
        super().__init__()
        self.gnn = gnn
        self.register_buffer("adj", adj, persistent=False)

    @classmethod
    def for_graph(cls, gnn: GNN, graph: Graph) -> GraphModule:
        return cls(gnn, gnn.adjacency(graph.edge_index, graph.num_nodes))

    @property
    def config(self) -> dict[str, Any]:
        return self.gnn.config

    def _check(self, x: Tensor) -> None:
        if x.shape[0] != self.adj.shape[0]:
            raise ValueError(
                f"GraphModule needs the full node feature matrix ({self.adj.shape[0]} rows), got {x.shape[0]}"
            )

    def hidden(self, x: Tensor) -> Tensor:
        self._check(x)
        return self.gnn.hidden(x, self.adj)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return self.gnn(x, self.adj)


def _as_classifier(model: nn.Module, graph: Graph) -> nn.Module:
    """A bare GNN gets bound to the graph; anything else is taken to be a classifier called as model(x)."""
    if isinstance(model, GNN):
        device = next(model.parameters()).device
        adj = model.adjacency(graph.edge_index.to(device), graph.num_nodes)
        return GraphModule(model, adj)
    return model


def _accuracy(logits: Tensor, y: Tensor, idx: Tensor) -> float:
    if idx.numel() == 0:
        return float("nan")
    return float((logits[idx].argmax(-1) == y[idx]).float().mean())


def train_full_batch(
    model: nn.Module,
    graph: Graph,
    epochs: int = 200,
    lr: float = 0.01,
    weight_decay: float = 5e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Train transductively on `graph.train_idx` (full-batch Adam, cross-entropy) and keep the weights of
    the epoch with the best validation accuracy (earliest on ties); the test split is only reported.

    `model` is a `GCN`/`GraphSAGE` (bound to the graph here), a `GraphModule`, or any classifier called as
    `model(x)` on all nodes (e.g. an MLP baseline). `seed` fixes dropout; the global RNG is left untouched.
    Returns {"val_acc", "test_acc", "epoch"} (epoch is 1-based; 0 means the initial weights won).
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    device = next(model.parameters()).device
    g = graph.to(device)
    clf = _as_classifier(model, g)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)

    def evaluate() -> tuple[float, float]:
        clf.eval()
        with torch.no_grad():
            logits = clf(g.x)
        return _accuracy(logits, g.y, g.val_idx), _accuracy(logits, g.y, g.test_idx)

    best_val, best_test = evaluate()
    best_epoch, best_state = 0, copy.deepcopy(model.state_dict())
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for epoch in range(1, epochs + 1):
            clf.train()
            opt.zero_grad()
            loss = F.cross_entropy(clf(g.x)[g.train_idx], g.y[g.train_idx])
            loss.backward()
            opt.step()
            val, test = evaluate()
            if val > best_val:
                best_val, best_test, best_epoch = val, test, epoch
                best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return {"val_acc": best_val, "test_acc": best_test, "epoch": best_epoch}


def node_hidden(model: nn.Module, graph: Graph) -> Tensor:
    """The last hidden representation of every node (eval mode, no grad), for a GNN or GraphModule."""
    if isinstance(model, GraphModule):
        clf = model
    elif isinstance(model, GNN):
        clf = GraphModule.for_graph(model, graph.to(next(model.parameters()).device))
    else:
        raise TypeError(f"node_hidden needs a GNN or GraphModule, got {type(model).__name__}")
    was_training = clf.training
    clf.eval()
    with torch.no_grad():
        h = clf.hidden(graph.x.to(clf.adj.device))
    clf.train(was_training)
    return h


def kmeans(points: Tensor, k: int, iterations: int = 10, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Plain k-means (k-means++ seeding, `iterations` Lloyd steps), deterministic by `seed`.

    Returns (centroids (k, D), assignment (N,) int64). An emptied cluster keeps its previous centroid.
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} points, got {k}")
    pts = points.detach().double().cpu()
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [pts[first]]
    d2 = ((pts - pts[first]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 if float(d2.sum()) > 0 else torch.ones(n, dtype=torch.float64)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        centroids.append(pts[nxt])
        d2 = torch.minimum(d2, ((pts - pts[nxt]) ** 2).sum(1))
    cent = torch.stack(centroids)
    assign = torch.cdist(pts, cent).argmin(1)
    for _ in range(iterations):
        sums = torch.zeros_like(cent).index_add_(0, assign, pts)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        cent = torch.where(counts > 0, sums / counts.clamp_min(1), cent)
        new_assign = torch.cdist(pts, cent).argmin(1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return cent.to(points.dtype).to(points.device), assign.to(points.device)


def structure_codes(model: nn.Module, graph: Graph, codes: int = 32, seed: int = 0) -> Tensor:
    """A discrete structure token per node: k-means over the GNN's last hidden layer.

    A simplified stand-in for VQGraph (Yang et al. 2024), which learns the codebook end-to-end with a
    VQ-VAE on graph structure; here the codebook is just the k-means centroids of a trained teacher's
    hidden states. Use `kmeans(node_hidden(...))` directly when the codebook itself is needed.
    """
    _, assign = kmeans(node_hidden(model, graph), codes, seed=seed)
    return assign


def code_soft_labels(hidden: Tensor, codebook: Tensor, temperature: float = 1.0) -> Tensor:
    """Soft code assignments (N, codes): softmax over negative squared distances / `temperature`, the
    VQGraph-style target a student MLP can match instead of (or besides) class soft labels."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    d2 = torch.cdist(hidden.float(), codebook.float()).pow(2)
    return torch.softmax(-d2 / temperature, dim=-1)
