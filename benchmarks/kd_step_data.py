"""kd_step benchmark: the quickstart pair (teacher + pruned student), the teacher's answers, fixed batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.data.answers import example_row, stored_train_answers
from distill.data.batching import IGNORE, Batch
from distill.data.generate import generate_completions
from distill.data.records import Example, read_examples
from distill.data.tokenize import TokenizedExample
from distill.io import write_jsonl_atomic
from distill.models.student import prune_depth
from distill.recipe import Recipe
from kd_step_measure import log


@dataclass
class Pair:
    recipe: Recipe
    teacher: PreTrainedModel
    student: PreTrainedModel  # the untrained pruned student; every variant trains a deep copy
    tokenizer: PreTrainedTokenizerBase
    vocab: int
    device: torch.device


def build_pair(
    recipe: Recipe, teacher: PreTrainedModel, tok: PreTrainedTokenizerBase, device: torch.device
) -> Pair:
    assert recipe.student.prune is not None
    teacher.to(device).eval()  # type: ignore[arg-type]
    student, _ = prune_depth(teacher, recipe.student.prune)
    student.to(device).train()  # type: ignore[arg-type]
    vocab = min(teacher.get_output_embeddings().weight.shape[0], len(tok))  # type: ignore[union-attr]
    return Pair(recipe, teacher, student, tok, vocab, device)


def teacher_answers(recipe: Recipe, pair: Pair, n_prompts: int) -> tuple[list[Example], str]:
    """The quickstart's cached teacher answers, or fresh ones for `n_prompts` prompts."""
    stored = stored_train_answers(recipe)
    if stored is not None:
        return read_examples(str(stored)), f"{stored} (the quickstart's stored teacher answers)"
    own = Path("runs") / "benchmarks" / f"kd_step_answers_{n_prompts}.jsonl"  # runs/ is git-ignored
    if own.exists():  # rows keep `finished`: no end token is learnt after a cut answer
        return read_examples(str(own)), f"{own} (this benchmark's earlier teacher answers)"
    prompts = read_examples(recipe.data.train.path)
    step = max(1, len(prompts) // n_prompts)
    prompts = prompts[::step][:n_prompts]  # spread over the file's categories
    assert recipe.data.generate is not None
    cfg = recipe.data.generate.model_copy(update={"max_new_tokens": 64})
    log(
        f"no stored quickstart answers (run `distill quickstart` first): the teacher answers {len(prompts)} prompts (max_new_tokens 64)"
    )
    out = generate_completions(
        pair.teacher, pair.tokenizer, prompts, cfg, system_prompt=recipe.data.system_prompt
    )
    write_jsonl_atomic(own, [example_row(ex) for ex in out])
    return out, f"{len(out)} quickstart prompts answered by the teacher now (saved to {own})"


def chat_rows(examples: list[Example]) -> list[dict[str, Any]]:
    """The answers as chat `messages` rows (TRL's input)."""
    return [
        {"messages": [*ex.prompt, {"role": "assistant", "content": ex.completion or ""}]} for ex in examples
    ]


def _example_targets(ex: TokenizedExample) -> list[int]:
    ids = ex.input_ids
    return [ids[i + 1] if i + 1 >= ex.prompt_len else IGNORE for i in range(len(ids) - 1)] + [IGNORE]


def dense_batch(input_ids: torch.Tensor, targets: torch.Tensor) -> Batch:
    """A batch of (B, L) real tokens: no padding, positions 0..L-1 in every row."""
    bsz, length = input_ids.shape
    return Batch(
        input_ids=input_ids,
        attention_mask=torch.ones(bsz, length, dtype=torch.long),
        position_ids=torch.arange(length).expand(bsz, length).clone(),
        targets=targets,
        num_real_tokens=bsz * length,
    )


def fixed_batches(examples: list[TokenizedExample], batch_size: int, length: int, count: int) -> list[Batch]:
    """`count` batches of `batch_size` rows of exactly `length` real tokens: real examples concatenated
    (causally, like classic LM packing) and cut at the row end, so there is no padding at all and every
    variant sees identical tensors. Loss positions are the answer tokens, as in training."""
    need = count * batch_size * length
    ids: list[int] = []
    tgt: list[int] = []
    i = 0
    while len(ids) < need:
        ex = examples[i % len(examples)]
        ids.extend(ex.input_ids)
        tgt.extend(_example_targets(ex))
        i += 1
    input_ids = torch.tensor(ids[:need]).view(count, batch_size, length)
    targets = torch.tensor(tgt[:need]).view(count, batch_size, length)
    targets[..., -1] = IGNORE  # the next token lies in the next row
    return [dense_batch(input_ids[c].clone(), targets[c].clone()) for c in range(count)]


def hf_labels(batch: Batch) -> torch.Tensor:
    """HF-style labels (the model shifts them) with exactly the loss positions of `batch.targets`."""
    labels = torch.full_like(batch.input_ids, IGNORE)
    labels[:, 1:] = batch.targets[:, :-1]
    return labels
