"""The embedding family end to end on a tiny teacher: every loss trains, the export loads with
sentence-transformers and embeds as the trained encoder does, a killed run resumes bit for bit, and
bad input is one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from distill.embed.encoders import load_encoder
from distill.embed.text import TextStream
from distill.engine.trainer import train
from distill.families.embed import EmbedFamily
from distill.methods.embed.kd import EmbedKD
from distill.pipeline import run_recipe
from distill.progress import NullProgress
from distill.recipe import parse_recipe
from distill.recipe_base import TrainConfig
from tests.cli.test_errors import assert_one_line_error, run_cli, write
from tests.embed.conftest import SENTENCES, embed_recipe

EVERY_LOSS = {
    "name": "embed_kd", "mse": 1.0, "cosine": 0.5, "similarity": 1.0, "similarity_mse": 1.0, "relations": 0.5,
    "relation_heads": 2, "matryoshka_dims": [8, 16],
}  # fmt: skip


def test_every_loss_trains_and_the_export_loads_in_sentence_transformers(
    tmp_path: Path, tiny_teacher: Path
) -> None:
    data = embed_recipe(
        tmp_path, tiny_teacher, EVERY_LOSS, baselines=[{"name": "embed_kd", "label": "plain"}]
    )
    summary = run_recipe(parse_recipe(data))
    for label in ("embed_kd", "plain"):
        after = summary["methods"][label]["after"]
        assert -1 <= after["spearman"] <= 1 and 0 <= after["recall_at_2"] <= 1
        assert after["sentences_per_s"] > 0 and after["speedup"] > 0
    assert summary["student"]["layers"] == [1] and summary["teacher_info"]["layers"] == 2
    st = pytest.importorskip("sentence_transformers")
    folder = tmp_path / "out" / "methods" / "embed_kd" / "student"
    model = st.SentenceTransformer(str(folder), device="cpu")
    encoder, tokenizer = load_encoder(folder)
    enc = tokenizer(SENTENCES[:5], padding=True, return_tensors="pt")
    with torch.no_grad():
        mine = encoder(enc["input_ids"], enc["attention_mask"])
    theirs = model.encode(SENTENCES[:5], convert_to_tensor=True)
    assert torch.allclose(mine, theirs, atol=1e-5)
    assert len(model[0].auto_model.encoder.layer) == 1


def test_fresh_narrow_student_with_projection_and_matryoshka(tmp_path: Path, tiny_teacher: Path) -> None:
    method = {
        "name": "embed_kd",
        "mse": 1.0,
        "similarity": 1.0,
        "projection": True,
        "relations": 1.0,
        "relation_heads": 2,
        "matryoshka_dims": [8],
    }
    student = {"init": "fresh", "num_layers": 1, "hidden_size": 16, "heads": 2, "intermediate_size": 32}
    summary = run_recipe(parse_recipe(embed_recipe(tmp_path, tiny_teacher, method, student=student)))
    assert summary["student"]["width"] == 16
    assert (tmp_path / "out" / "methods" / "embed_kd" / "student" / "model.safetensors").exists()


def test_training_moves_the_student_towards_the_teacher(tmp_path: Path, tiny_teacher: Path) -> None:
    """A fresh student's cosine distance to the teacher's embeddings on the training sentences halves in 30
    steps (a pruned copy of a random teacher starts too close to tell)."""
    student = {"init": "fresh", "num_layers": 1}
    losses = {"name": "embed_kd", "cosine": 1.0, "mse": 0.0}
    r = parse_recipe(embed_recipe(tmp_path, tiny_teacher, losses, student=student))
    family = EmbedFamily()
    family.prepare(r, Accelerator(cpu=True), NullProgress())
    method = family.make_method(r.method, 0)
    assert isinstance(method, EmbedKD)

    def distance() -> float:
        with torch.no_grad():
            s = method.student.eval()(family.train_ids, family.train_mask)
            t = family.teacher(family.train_ids, family.train_mask)
        method.student.train()
        return float(1 - torch.nn.functional.cosine_similarity(s, t).mean())

    before = distance()
    cfg = TrainConfig(steps=30, lr=3e-3, max_grad_norm=None)
    train(method=method, stream=family.make_stream(method, 0), cfg=cfg, out_dir=tmp_path / "t", seed=0)
    assert distance() < 0.5 * before


def test_killed_run_resumes_to_the_same_student(tmp_path: Path, tiny_teacher: Path) -> None:
    r = parse_recipe(embed_recipe(tmp_path, tiny_teacher, EVERY_LOSS))
    family = EmbedFamily()
    family.prepare(r, Accelerator(cpu=True), NullProgress())
    cfg = TrainConfig(steps=6, lr=1e-3, checkpoint_every=3)

    def run(out: Path, resume: bool) -> dict[str, torch.Tensor]:
        method = family.make_method(r.method, 0)
        train(
            method=method, stream=family.make_stream(method, 0), cfg=cfg, out_dir=out, seed=0, resume=resume
        )
        return {k: v.detach().clone() for k, v in method.modules()["student"].state_dict().items()}

    whole = run(tmp_path / "a", False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for ckpt in (tmp_path / "b" / "checkpoints").iterdir():
        if not ckpt.name.endswith("3"):
            shutil.rmtree(ckpt)
    again = run(tmp_path / "b", True)
    assert all(torch.equal(whole[k], again[k]) for k in whole)


def test_stream_resumes_mid_epoch() -> None:
    ids, mask = torch.arange(40).reshape(10, 4), torch.ones(10, 4, dtype=torch.long)
    a = TextStream(ids, mask, 3, seed=1)
    for _ in range(4):
        a.next_batch()
    b = TextStream(ids, mask, 3, seed=1)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.next_batch().index, b.next_batch().index)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"student": {"init": "fresh", "num_layers": 1, "hidden_size": 16, "heads": 2}}, "method.projection"),
        ({"student": {"init": "prune", "layers": [0, 5]}}, "student.layers.1"),
        ({"student": {"init": "fresh", "hidden_size": 64}}, "student.hidden_size"),
        ({"method": {"name": "embed_kd", "relations": 1.0, "relation_heads": 5}}, "method.relation_heads"),
        ({"method": {"name": "embed_kd", "matryoshka_dims": [99]}}, "method.matryoshka_dims"),
        ({"data": {"train": "nope.jsonl"}}, "data.train"),
        ({"method": {"name": "embed_kd", "mse": 0.0}}, "every loss weight is 0"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, tiny_teacher: Path, change: dict, needle: str) -> None:
    data = embed_recipe(tmp_path, tiny_teacher, {"name": "embed_kd"})
    data.update(change)
    assert_one_line_error(run_cli("validate", str(write(tmp_path, data))), needle)


def test_sentence_file_without_the_field(tmp_path: Path, tiny_teacher: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt here"}\n', encoding="utf-8")
    data = embed_recipe(tmp_path, tiny_teacher, {"name": "embed_kd"})
    data["data"]["train"] = str(bad)
    assert_one_line_error(run_cli("run", str(write(tmp_path, data))), "data.train", "line 2", "'prompt'")
