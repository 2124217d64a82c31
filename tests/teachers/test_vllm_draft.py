"""vLLM (CPU build) serving SmolLM2-135M-Instruct with a drafter that distill exported, through vLLM's
speculative-decoding config (`--speculative-config '{"method": "draft_model", ...}'`): the server accepts
the folder, proposes drafts with it, and greedy output stays the target's own greedy output (speculative
decoding is lossless). Slow: one vLLM start, about a minute here."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.configs.lm_sections import PruneConfig
from distill.data.tokenize import prompt_ids
from distill.generation.engine import generate_tokens
from distill.generation.sampling import SamplingSpec
from distill.models.loading import save_student
from distill.models.student import prune_depth
from tests.teachers.test_served import VllmServer, serving

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 12 plus 7?"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def drafter_dir(smol_live: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block drafter pruned from the target, saved by distill's own export (what `drafter` writes)."""
    folder = tmp_path_factory.mktemp("drafter") / "student"
    draft, _ = prune_depth(smol_live.model, PruneConfig(keep_layers=2))
    save_student(draft, smol_live.tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def draft_server(
    vllm_python: Path, smol_hf_dir: Path, drafter_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    spec = {"method": "draft_model", "model": str(drafter_dir), "num_speculative_tokens": 3}
    log = tmp_path_factory.mktemp("vllm-draft") / "server.log"
    server = VllmServer(vllm_python, smol_hf_dir, log, ("--speculative-config", json.dumps(spec)))
    yield from serving(server, "vLLM with a draft model")


def _metric(server: VllmServer, name: str) -> float:
    base = server.url.removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as r:
        text = r.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]
    assert values, f"vLLM reports no {name}"
    return sum(values)


def test_vllm_serves_the_target_with_a_distill_drafter(draft_server: VllmServer, smol_live: Any) -> None:
    tok, model = smol_live.tokenizer, smol_live.model
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}], None) for q in QUESTIONS]
    served = []
    for p in prompts:
        body = {"model": "smol", "prompt": p, "max_tokens": NEW_TOKENS, "temperature": 0}
        req = urllib.request.Request(
            f"{draft_server.url}/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            served.append(json.loads(r.read())["choices"][0]["text"])
    assert _metric(draft_server, "vllm:spec_decode_num_drafts_total") > 0  # the drafter proposed tokens
    assert _metric(draft_server, "vllm:spec_decode_num_draft_tokens_total") > 0
    eos = [tok.eos_token_id]
    rows = generate_tokens(
        model, prompts, SamplingSpec(temperature=0.0), NEW_TOKENS, eos, pad_id=0, batch_size=4
    )
    with torch.no_grad():
        for p, text, row in zip(prompts, served, rows, strict=True):
            local = str(tok.decode(row.tokens, skip_special_tokens=True))
            if text.strip() == local.strip():
                continue
            # lossless up to fp32 kernel differences: a divergence must sit at a near-tie of the target
            ours = tok(text, add_special_tokens=False)["input_ids"]
            first = next(i for i, (a, b) in enumerate(zip(ours, row.tokens, strict=False)) if a != b)
            logits = model(torch.tensor([p + row.tokens[:first]])).logits[0, -1]
            top2 = logits.topk(2).values
            assert float(top2[0] - top2[1]) < 1e-3, f"greedy output differs: {text!r} vs {local!r}"
