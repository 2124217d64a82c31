"""A tiny sentence-transformers teacher (random BERT, the MiniLM tokenizer) and sentence files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from distill.embed.encoders import SentenceEncoder, export_sentence_transformers
from distill.paths import resolve_path
from distill.recipe_embed import MINILM

SENTENCES = [
    "The cat sat on the mat.", "A dog barked at the mailman.", "Stocks fell sharply on Monday.",
    "The recipe needs two eggs and flour.", "Rain is expected over the weekend.", "He plays the violin.",
    "Photosynthesis turns light into sugar.", "The train was late again.", "Café crème, s'il vous plaît!",
    "Quantum computers use qubits.", "She painted the fence   blue.", "Why is the sky blue?",
    "Bake the bread for forty minutes.", "The match ended in a draw.", "Volcanoes erupt when pressure builds.",
    "我喜欢喝茶。", "Whales are mammals, not fish.", "The library opens at nine.",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block, 32-wide BERT with mean pooling and normalisation, saved as a sentence-transformers folder."""
    folder = tmp_path_factory.mktemp("tiny-teacher")
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(MINILM))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    export_sentence_transformers(SentenceEncoder(BertModel(config), "mean", True), tokenizer, folder, 32)
    return folder


def sentence_files(tmp_path: Path) -> tuple[Path, Path]:
    train, held = tmp_path / "train.jsonl", tmp_path / "held.txt"
    train.write_text("".join(json.dumps({"prompt": s}) + "\n" for s in SENTENCES[:12]), encoding="utf-8")
    held.write_text("\n".join(SENTENCES[12:]) + "\n", encoding="utf-8")
    return train, held


def embed_recipe(tmp_path: Path, teacher: Path, method: dict[str, Any], **sections: Any) -> dict[str, Any]:
    train, held = sentence_files(tmp_path)
    data: dict[str, Any] = {
        "name": "embed-test",
        "output_dir": str(tmp_path / "out"),
        "teacher": {"path": str(teacher)},
        "student": {"init": "prune", "layers": [1]},
        "data": {"train": str(train), "heldout": str(held), "batch_size": 4, "max_length": 24},
        "method": method,
        "train": {"steps": 4, "lr": 1e-3, "threads": 1},
        "eval": {"batch_size": 4, "recall_k": 2, "throughput_repeats": 1, "before": False},
    }
    data.update(sections)
    return data
