"""Reranker distillation (rerank_kd) on a tiny teacher: cross- and bi-encoder students train, evaluate
and export folders that sentence-transformers loads and scores as we do; the stream's candidates are
right, deterministic and resumable; a killed run resumes bit for bit; bad input is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator

from distill.embed.rerank_data import RerankStream, read_pairs
from distill.embed.rerank_scorers import export_cross_encoder
from distill.engine.trainer import train
from distill.errors import InputError
from distill.families.embed import EmbedFamily
from distill.methods.base import Phase, StepContext
from distill.methods.embed.margin_mse import RerankKD
from distill.paths import resolve_path
from distill.pipeline import run_recipe
from distill.progress import NullProgress
from distill.recipe import parse_recipe
from distill.recipe_base import TrainConfig
from tests.cli.test_errors import assert_one_line_error, run_cli, write

DATA = "pkg:distill/recipes/data"
CROSS = {"name": "rerank_kd", "label": "cross", "student_kind": "cross", "negatives": 2, "mine_depth": 4}
BI = {"name": "rerank_kd", "label": "bi", "student_kind": "bi", "negatives": 1, "listwise": 0.5}


def pair_files(tmp_path: Path, train_rows: int = 14, held_rows: int = 8) -> tuple[Path, Path]:
    """The first rows of the shipped pairs (real stdlib docstrings), trimmed to a few pairs."""
    out = []
    for part, n in (("train", train_rows), ("heldout", held_rows)):
        lines = resolve_path(f"{DATA}/rerank_{part}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        path = tmp_path / f"{part}.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out.append(path)
    return out[0], out[1]


def rerank_recipe(tmp_path: Path, teacher: Path, method: dict[str, Any], **sections: Any) -> dict[str, Any]:
    train_file, held_file = pair_files(tmp_path)
    data: dict[str, Any] = {
        "name": "rerank-test",
        "output_dir": str(tmp_path / "out"),
        "teacher": {"path": str(teacher)},
        "student": {"init": "prune", "layers": [1]},
        "data": {"train": str(train_file), "heldout": str(held_file), "batch_size": 4, "max_length": 32},
        "method": method,
        "train": {"steps": 3, "lr": 1e-3, "threads": 1},
        "eval": {"batch_size": 16, "recall_k": 3, "rerank_pool": 5, "throughput_repeats": 1},
    }
    data.update(sections)
    return data


def prepared(tmp_path: Path, teacher: Path, method: dict[str, Any]) -> tuple[EmbedFamily, Any]:
    r = parse_recipe(rerank_recipe(tmp_path, teacher, method))
    family = EmbedFamily()
    family.prepare(r, Accelerator(cpu=True), NullProgress())
    return family, r


def test_cross_and_bi_students_train_evaluate_and_export(tmp_path: Path, tiny_teacher: Path) -> None:
    summary = run_recipe(parse_recipe(rerank_recipe(tmp_path, tiny_teacher, CROSS, baselines=[BI])))
    assert summary["data"]["rerank"] == {
        "train_pairs": 14, "train_passages": 14, "heldout_queries": 8, "heldout_passages": 8, "pool": 5,
    }  # fmt: skip
    for entry in [summary["before"]] + [summary["methods"][k]["after"] for k in ("cross", "bi")]:
        for key in ("spearman", "spearman_pairs", "ndcg_at_10"):
            assert -1 <= entry[key] <= 1
        assert 0 <= entry["recall_at_3"] <= 1 and 0 < entry["mrr_at_10"] <= 1
        assert entry["pairs_per_s"] > 0 and entry["teacher_pairs_per_s"] > 0
    assert [c["key"] for c in summary["columns"]][:4] == [
        "spearman",
        "recall_at_3",
        "ndcg_at_10",
        "mrr_at_10",
    ]
    st = pytest.importorskip("sentence_transformers")
    out = tmp_path / "out" / "methods"
    bi = st.SentenceTransformer(str(out / "bi" / "student"), device="cpu")
    assert bi.encode(["a query"]).shape == (1, 32)
    cross = st.CrossEncoder(str(out / "cross" / "student"), device="cpu")
    assert len(cross.model.bert.encoder.layer) == 1


def test_cross_encoder_export_scores_as_we_do(tmp_path: Path, tiny_teacher: Path) -> None:
    """The exported folder, loaded by CrossEncoder and by AutoModelForSequenceClassification, gives the
    method's own scores (raw, no sigmoid) to 1e-5, truncation included."""
    family, r = prepared(tmp_path, tiny_teacher, CROSS)
    method = family.make_method(r.method, 0)
    assert isinstance(method, RerankKD)
    with torch.no_grad():  # a head that is not near zero, so a wrong scale would show
        method.modules()["head"].weight.normal_(0, 1.0)
        method.modules()["head"].bias.fill_(0.3)
    method.set_training(False)
    held = family.rerank.held
    queries = held.queries[:4] + [held.queries[0] + " padded with many more words" * 6]
    passages = held.passages[:4] + [held.passages[1] * 3]  # the last pair needs truncation
    ours = method.scorer()(queries, passages, 2)
    body, head = method.modules()["student"], method.modules()["head"]
    export_cross_encoder(body, head, family.tokenizer, tmp_path / "ce", r.data.max_length)  # type: ignore[arg-type]
    st = pytest.importorskip("sentence_transformers")
    ce = st.CrossEncoder(str(tmp_path / "ce"), device="cpu")
    theirs = torch.as_tensor(ce.predict(list(zip(queries, passages, strict=True)), batch_size=3))
    torch.testing.assert_close(theirs.float(), ours, atol=1e-5, rtol=0)
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ce").eval()
    enc = family.tokenizer(
        queries[:2], passages[:2], padding=True, truncation=True, max_length=32, return_tensors="pt"
    )
    with torch.no_grad():
        torch.testing.assert_close(hf(**enc).logits.flatten(), ours[:2], atol=1e-5, rtol=0)


def test_stream_candidates_are_positive_first_mined_and_resumable(tmp_path: Path, tiny_teacher: Path) -> None:
    family, r = prepared(tmp_path, tiny_teacher, CROSS)
    task = family.rerank
    assert task is not None
    hard = task.hard_negatives(4, 2)
    assert hard.shape == (14, 4) and not (hard == task.train.positive[:, None]).any()

    def stream(kind: str) -> RerankStream:
        return RerankStream(
            task.train, hard, family.tokenizer, kind=kind, batch_size=4, negatives=2, in_batch=1,
            max_length=32, seed=3,
        )  # fmt: skip

    a = stream("cross")
    for _ in range(5):  # past one epoch of 3 batches
        b = a.next_batch()
        q, cand = b.query.tolist(), b.candidates
        assert cand.shape == (4, 4) and b.tokens["ids"].shape[0] == 16
        assert cand[:, 0].tolist() == task.train.positive[q].tolist()
        for i, row in enumerate(cand.tolist()):
            assert set(row[1:3]) <= set(hard[q[i]].tolist())
            assert row[3] == int(task.train.positive[q[(i + 1) % 4]])
    b_stream = stream("cross")
    b_stream.load_state_dict({"epoch": 1, "index": 0})
    c = stream("cross")
    for _ in range(3):
        c.next_batch()
    assert torch.equal(b_stream.next_batch().candidates, c.next_batch().candidates)
    bi = stream("bi").next_batch()
    assert torch.equal(bi.candidates, stream("cross").next_batch().candidates)
    p = bi.tokens["p_index"]
    assert p.shape == (4, 4) and bi.tokens["p_ids"].shape[0] == int(p.max()) + 1


def test_the_loss_fits_the_teacher_margins_of_a_batch(tmp_path: Path, tiny_teacher: Path) -> None:
    """The cross student (one block of the random tiny teacher + a head) starts near-blind to the
    candidates (the teacher's margins are ~0.01); 30 Adam steps on one batch's loss fit them 5x closer."""
    family, r = prepared(tmp_path, tiny_teacher, CROSS)
    method = family.make_method(r.method, 0)
    assert isinstance(method, RerankKD)
    probe = method.prepare(family.make_stream(method, 0).next_batch(), Phase())
    modules = method.modules()

    def margin_error() -> float:
        with torch.no_grad():
            s, t = method.scores(modules, probe), probe.teacher
            assert t is not None
            return float((((s[:, :1] - s[:, 1:]) - (t[:, :1] - t[:, 1:])) ** 2).mean())

    before = margin_error()
    opt = torch.optim.Adam([p for m in modules.values() for p in m.parameters()], lr=1e-3)
    for step in range(30):
        loss, logs = method.loss(StepContext(modules, 4.0, Phase(), step, torch.device("cpu")), probe)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(logs) == {"margin_mse", "positive_top1"}
    assert margin_error() < 0.2 * before


def test_killed_run_resumes_to_the_same_cross_student(tmp_path: Path, tiny_teacher: Path) -> None:
    family, r = prepared(tmp_path, tiny_teacher, CROSS)
    cfg = TrainConfig(steps=4, lr=1e-3, checkpoint_every=2)

    def run(out: Path, resume: bool) -> dict[str, torch.Tensor]:
        method = family.make_method(r.method, 0)
        train(
            method=method, stream=family.make_stream(method, 0), cfg=cfg, out_dir=out, seed=0, resume=resume
        )
        mods = method.modules()
        return {
            f"{n}.{k}": v.detach().clone()
            for n in ("student", "head")
            for k, v in mods[n].state_dict().items()
        }

    whole = run(tmp_path / "a", False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for ckpt in (tmp_path / "b" / "checkpoints").iterdir():
        if not ckpt.name.endswith("2"):
            shutil.rmtree(ckpt)
    again = run(tmp_path / "b", True)
    assert all(torch.equal(whole[k], again[k]) for k in whole)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"method": {"name": "rerank_kd", "student_kind": "tri"}}, "student_kind"),
        ({"method": {"name": "rerank_kd", "negatives": 0, "in_batch_negatives": 0}}, "at least 2 candidates"),
        ({"method": {"name": "rerank_kd", "in_batch_negatives": 4}}, "method: in_batch_negatives"),
        ({"method": {"name": "rerank_kd", "negatives": 5, "mine_depth": 3}}, "method: negatives"),
        ({"method": {"name": "rerank_kd", "margin_mse": 0.0}}, "every loss weight is 0"),
        ({"baselines": [{"name": "embed_kd"}]}, "cannot share a run with embed_kd"),
    ],
)
def test_bad_recipes_are_one_line(tmp_path: Path, tiny_teacher: Path, change: dict, needle: str) -> None:
    data = rerank_recipe(tmp_path, tiny_teacher, {"name": "rerank_kd"})
    data.update(change)
    assert_one_line_error(run_cli("validate", str(write(tmp_path, data))), needle)


def test_pairs_file_without_passage_is_one_line(tmp_path: Path, tiny_teacher: Path) -> None:
    data = rerank_recipe(tmp_path, tiny_teacher, {"name": "rerank_kd"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "passage": "p"}) + "\n" + json.dumps({"query": "x"}) + "\n")
    data["data"]["train"] = str(bad)
    assert_one_line_error(run_cli("run", str(write(tmp_path, data))), "data.train", "line 2", "'passage'")


def test_data_errors_name_the_field(tmp_path: Path, tiny_teacher: Path) -> None:
    train_file, held_file = pair_files(tmp_path)
    with pytest.raises(InputError, match="data.heldout: .* also occur in data.train"):
        prepared_bad = rerank_recipe(tmp_path, tiny_teacher, {"name": "rerank_kd"})
        prepared_bad["data"]["heldout"] = str(train_file)
        EmbedFamily().prepare(parse_recipe(prepared_bad), Accelerator(cpu=True), NullProgress())
    one = tmp_path / "one.jsonl"
    one.write_text(
        json.dumps({"query": "a", "passage": "p"}) + "\n" + json.dumps({"query": "b", "passage": "p"})
    )
    with pytest.raises(InputError, match="data.train: .* 1 distinct passage"):
        read_pairs(one, "data.train")
    with pytest.raises(InputError, match="data.heldout: .*JSON lines"):
        read_pairs(tmp_path / "pairs.txt", "data.heldout")
