"""Graph data and plain-torch GNN teachers: SBM invariants, sparse ops against dense references, the GCN's
edge over a features-only MLP, file loading errors, and deterministic structure codes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from distill.errors import InputError
from distill.graphs.files import load_graph_files
from distill.graphs.gnn import (
    GCN,
    GraphModule,
    GraphSAGE,
    code_soft_labels,
    kmeans,
    mean_adjacency,
    node_hidden,
    normalized_adjacency,
    structure_codes,
    train_full_batch,
)
from distill.graphs.sbm import Graph, measured_homophily, stochastic_block_model


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Small sparse graphs run faster on one thread, and far faster on a busy machine (no spin-waits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sbm() -> Graph:
    return stochastic_block_model(nodes=800, seed=1)


def dense_adjacency(edge_index: torch.Tensor, n: int) -> torch.Tensor:
    a = torch.zeros(n, n, dtype=torch.float64)
    for i, j in edge_index.t().tolist():
        a[i, j] = 1.0
    return a


# --- SBM ------------------------------------------------------------------------------------------------


def test_sbm_is_deterministic_by_seed() -> None:
    a, b = stochastic_block_model(nodes=300, seed=4), stochastic_block_model(nodes=300, seed=4)
    for field in ("x", "y", "edge_index", "train_idx", "val_idx", "test_idx"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    c = stochastic_block_model(nodes=300, seed=5)
    assert not torch.equal(a.edge_index, c.edge_index)
    assert not torch.equal(a.x, c.x)


def test_sbm_edges_are_simple_and_symmetric(sbm: Graph) -> None:
    ei = sbm.edge_index
    assert ei.dtype == torch.long and ei.shape[0] == 2
    assert sbm.x.dtype == torch.float32 and sbm.y.dtype == torch.long
    assert not bool((ei[0] == ei[1]).any())
    keys = ei[0] * sbm.num_nodes + ei[1]
    assert torch.unique(keys).numel() == keys.numel()
    rev = torch.sort(ei[1] * sbm.num_nodes + ei[0]).values
    assert torch.equal(torch.sort(keys).values, rev)


@pytest.mark.parametrize("homophily", [0.2, 0.8, 0.95])
def test_sbm_homophily_and_degree(homophily: float) -> None:
    g = stochastic_block_model(nodes=1000, avg_degree=8.0, homophily=homophily, seed=2)
    assert abs(measured_homophily(g) - homophily) <= 0.05
    mean_degree = g.edge_index.shape[1] / g.num_nodes
    assert abs(mean_degree - 8.0) <= 0.8


def test_sbm_splits(sbm: Graph) -> None:
    parts = [sbm.train_idx, sbm.val_idx, sbm.test_idx]
    allidx = torch.cat(parts)
    assert allidx.numel() == torch.unique(allidx).numel() == sbm.num_nodes
    assert torch.bincount(sbm.y[sbm.train_idx], minlength=sbm.classes).tolist() == [20] * sbm.classes
    rest = sbm.num_nodes - sbm.train_idx.numel()
    assert sbm.val_idx.numel() == round(0.2 * rest)


# --- sparse operators and models against dense references ----------------------------------------------


def test_normalized_adjacency_matches_dense_reference(sbm: Graph) -> None:
    n = sbm.num_nodes
    adj = normalized_adjacency(sbm.edge_index, n)
    assert adj.is_sparse and adj.is_coalesced()
    a = dense_adjacency(sbm.edge_index, n) + torch.eye(n, dtype=torch.float64)
    d = a.sum(1).rsqrt()
    ref = d[:, None] * a * d[None, :]
    assert torch.allclose(adj.to_dense().double(), ref, atol=1e-6)
    # without self loops: isolated nodes give zero rows instead of nan
    ei = torch.tensor([[0, 1], [1, 0]])
    plain = normalized_adjacency(ei, 3, add_self_loops=False).to_dense()
    assert torch.equal(plain, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_mean_adjacency_matches_dense_reference(sbm: Graph) -> None:
    a = dense_adjacency(sbm.edge_index, sbm.num_nodes)
    ref = a / a.sum(1, keepdim=True).clamp_min(1)
    got = mean_adjacency(sbm.edge_index, sbm.num_nodes).to_dense().double()
    assert torch.allclose(got, ref, atol=1e-6)


def test_gcn_and_sage_forward_match_dense_reference(sbm: Graph) -> None:
    torch.manual_seed(0)
    n, x = sbm.num_nodes, sbm.x.double()
    a = dense_adjacency(sbm.edge_index, n)
    gcn = GCN(x.shape[1], sbm.classes, hidden=16).eval()
    a_hat = a + torch.eye(n, dtype=torch.float64)
    d = a_hat.sum(1).rsqrt()
    a_hat = d[:, None] * a_hat * d[None, :]
    w0, b0 = gcn.lins[0].weight.double(), gcn.lins[0].bias.double()
    w1, b1 = gcn.lins[1].weight.double(), gcn.lins[1].bias.double()
    ref = a_hat @ torch.relu(a_hat @ x @ w0.t() + b0) @ w1.t() + b1
    got = gcn(sbm.x, GCN.adjacency(sbm.edge_index, n))
    assert torch.allclose(got.double(), ref, atol=1e-4)
    assert gcn.config == {"in_features": 32, "classes": 5, "hidden": 16, "layers": 2, "dropout": 0.5}

    sage = GraphSAGE(x.shape[1], sbm.classes, hidden=16).eval()
    m = a / a.sum(1, keepdim=True).clamp_min(1)

    def lin(module: nn.Linear, h: torch.Tensor) -> torch.Tensor:
        out = h @ module.weight.double().t()
        return out + module.bias.double() if module.bias is not None else out

    s, nb = sage.self_lins, sage.neigh_lins
    h = torch.relu(lin(s[0], x) + lin(nb[0], m @ x))
    ref = lin(s[1], h) + lin(nb[1], m @ h)
    got = sage(sbm.x, GraphSAGE.adjacency(sbm.edge_index, n))
    assert torch.allclose(got.double(), ref, atol=1e-4)
    assert sage.config["layers"] == 2


def test_graph_module_is_a_plain_classifier(sbm: Graph) -> None:
    torch.manual_seed(0)
    gnn = GCN(32, sbm.classes, hidden=8, layers=3).eval()
    module = GraphModule.for_graph(gnn, sbm).eval()
    assert torch.equal(module(sbm.x), gnn(sbm.x, GCN.adjacency(sbm.edge_index, sbm.num_nodes)))
    assert "adj" not in module.state_dict()
    assert module.config is gnn.config
    assert module.hidden(sbm.x).shape == (sbm.num_nodes, 8)
    with pytest.raises(ValueError, match="full node feature matrix"):
        module(sbm.x[:10])


# --- training: the graph must matter -------------------------------------------------------------------


def test_gcn_beats_mlp_on_labels_only(sbm: Graph) -> None:
    torch.manual_seed(0)
    gcn = GCN(32, sbm.classes)
    r_gcn = train_full_batch(gcn, sbm, epochs=100)
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Dropout(0.5), nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, sbm.classes)
    )
    r_mlp = train_full_batch(mlp, sbm, epochs=100)
    assert set(r_gcn) == {"val_acc", "test_acc", "epoch"}
    assert r_gcn["test_acc"] > r_mlp["test_acc"] + 0.10, (r_gcn, r_mlp)
    assert r_mlp["test_acc"] > 1.0 / sbm.classes  # features alone carry some signal
    # the best-validation weights were restored
    module = GraphModule.for_graph(gcn, sbm).eval()
    with torch.no_grad():
        val = (module(sbm.x)[sbm.val_idx].argmax(-1) == sbm.y[sbm.val_idx]).float().mean()
    assert float(val) == pytest.approx(r_gcn["val_acc"])


# --- files ---------------------------------------------------------------------------------------------


def write_graph(folder: Path, g: Graph, features: str = "npy") -> tuple[Path, Path, Path]:
    edges, labels = folder / "edges.txt", folder / "labels.txt"
    src, dst = g.edge_index
    keep = src < dst  # one direction only: the loader symmetrises
    lines = [
        "# an edge list",
        *(
            f"{a}, {b}" if i % 2 else f"{a}\t{b}"
            for i, (a, b) in enumerate(zip(src[keep].tolist(), dst[keep].tolist(), strict=True))
        ),
    ]
    edges.write_text("\n".join(lines) + "\n")
    labels.write_text("# labels\n" + "\n".join(str(v) for v in g.y.tolist()) + "\n")
    if features == "npy":
        feats = folder / "features.npy"
        np.save(feats, g.x.numpy())
    elif features == "safetensors":
        feats = folder / "features.safetensors"
        save_file({"x": g.x}, str(feats))
    else:
        feats = folder / "features.csv"
        rows = [",".join(f"f{i}" for i in range(g.x.shape[1]))]
        rows += [",".join(repr(v) for v in row) for row in g.x.tolist()]
        feats.write_text("\n".join(rows) + "\n")
    return edges, feats, labels


@pytest.mark.parametrize("features", ["npy", "safetensors", "csv"])
def test_load_graph_files_roundtrip(tmp_path: Path, features: str) -> None:
    g = stochastic_block_model(nodes=120, avg_degree=4.0, train_per_class=5, seed=3)
    loaded = load_graph_files(*write_graph(tmp_path, g, features), train_per_class=5, seed=3)
    assert torch.equal(loaded.x, g.x)
    assert torch.equal(loaded.y, g.y)
    assert torch.equal(loaded.edge_index, g.edge_index)
    assert loaded.classes == g.classes and loaded.name == "edges"
    for field in ("train_idx", "val_idx", "test_idx"):  # same splitting rule, same seed
        assert torch.equal(getattr(loaded, field), getattr(g, field))


def assert_one_line(err: pytest.ExceptionInfo[InputError], *parts: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, msg


def test_load_graph_files_errors(tmp_path: Path) -> None:
    g = stochastic_block_model(nodes=60, avg_degree=3.0, train_per_class=3, seed=0)
    edges, feats, labels = write_graph(tmp_path, g)

    def load() -> Graph:
        return load_graph_files(edges, feats, labels, train_per_class=3)

    good_edges = edges.read_text()
    edges.write_text(good_edges + "1 2\na b\n")
    n_line = len(good_edges.splitlines()) + 2
    with pytest.raises(InputError) as err:
        load()
    assert_one_line(err, f"edges.txt line {n_line}:", "expected two node ids, got 'a b'")

    edges.write_text("0 1\n\n# fine\n3 60\n")
    with pytest.raises(InputError) as err:
        load()
    assert_one_line(err, "edges.txt line 4:", "node id 60 out of range")

    edges.write_text("0 1 2\n")
    with pytest.raises(InputError) as err:
        load()
    assert_one_line(err, "edges.txt line 1:", "expected two node ids")
    edges.write_text(good_edges)

    good_labels = labels.read_text()
    labels.write_text("\n".join(good_labels.splitlines()[:-1]) + "\n")
    with pytest.raises(InputError) as err:
        load()
    assert_one_line(err, "labels.txt", "59 labels", "features.npy has 60 nodes")

    labels.write_text("0\n1.5\n")
    with pytest.raises(InputError) as err:
        load()
    assert_one_line(err, "labels.txt line 2:", "'1.5'")
    labels.write_text(good_labels)

    bad_csv = tmp_path / "features.csv"
    bad_csv.write_text("0.1,0.2\n0.3,x\n")
    with pytest.raises(InputError) as err:
        load_graph_files(edges, bad_csv, labels)
    assert_one_line(err, "features.csv line 2:", "'x'")
    bad_csv.write_text("0.1,0.2\n0.3\n")
    with pytest.raises(InputError) as err:
        load_graph_files(edges, bad_csv, labels)
    assert_one_line(err, "features.csv line 2:", "expected 2 values, got 1")

    wrong_key = tmp_path / "f.safetensors"
    save_file({"feats": g.x}, str(wrong_key))
    with pytest.raises(InputError) as err:
        load_graph_files(edges, wrong_key, labels)
    assert_one_line(err, "f.safetensors", "no tensor named 'x'", "feats")

    with pytest.raises(InputError) as err:
        load_graph_files(tmp_path / "missing.txt", feats, labels)
    assert_one_line(err, "missing.txt", "not found")
    not_npy = tmp_path / "broken.npy"
    not_npy.write_text("not a numpy file\nat all\n")
    with pytest.raises(InputError) as err:
        load_graph_files(edges, not_npy, labels)
    assert_one_line(err, "broken.npy")


# --- structure codes -----------------------------------------------------------------------------------


def test_structure_codes_deterministic(sbm: Graph) -> None:
    torch.manual_seed(0)
    gcn = GCN(32, sbm.classes, hidden=16)
    train_full_batch(gcn, sbm, epochs=20)
    a = structure_codes(gcn, sbm, codes=8, seed=3)
    b = structure_codes(GraphModule.for_graph(gcn, sbm), sbm, codes=8, seed=3)
    assert torch.equal(a, b)
    assert a.shape == (sbm.num_nodes,) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < 8
    assert torch.unique(a).numel() > 1

    hidden = node_hidden(gcn, sbm)
    codebook, assign = kmeans(hidden, 8, seed=3)
    assert torch.equal(assign, a)
    soft = code_soft_labels(hidden, codebook, temperature=0.5)
    assert soft.shape == (sbm.num_nodes, 8)
    assert torch.allclose(soft.sum(-1), torch.ones(sbm.num_nodes), atol=1e-5)
    assert torch.equal(soft.argmax(-1), assign)  # the assignment is the nearest centroid


def test_kmeans_separates_obvious_clusters() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = torch.cat([c + 0.1 * torch.randn(50, 2, generator=gen) for c in centres])
    _, assign = kmeans(pts, 3, seed=1)
    groups = assign.view(3, 50)
    assert all(torch.unique(row).numel() == 1 for row in groups)
    assert torch.unique(groups[:, 0]).numel() == 3
