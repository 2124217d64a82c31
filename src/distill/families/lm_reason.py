"""The language-model family with a reasoning data factory (`factory:` in the recipe): the teacher writes
several answers per task prompt, verifiers and filters decide what survives, and each method trains on
its own view of that data — the kept traces, every trace unfiltered, the shortest kept trace per prompt,
(correct, incorrect) pairs, or step-by-step's label and rationale tasks. Students are scored by held-out
answer accuracy with the same verifiers, and the factory's funnel goes into the report."""

from __future__ import annotations

from typing import Any

from distill.configs.base import MethodConfigBase
from distill.data.batching import BatchStream
from distill.data.pairs import PairStream, tokenize_pairs
from distill.data.reasoning_views import chunked_examples, step_by_step_pairs
from distill.data.records import Example
from distill.data.tokenize import TokenizedExample, tokenize_examples
from distill.errors import InputError
from distill.methods.base import Stream
from distill.progress import Progress
from distill.reasoning.evaluate import accuracy_columns, accuracy_metrics, answer_heldout
from distill.reasoning.factory import run_factory
from distill.reasoning.teacher_samples import teacher_sampler
from distill.reasoning.views import (
    FactoryOutput,
    funnel_rows,
    pair_examples,
    shortest_examples,
    unfiltered_examples,
    verified_examples,
)
from distill.recipe import Recipe
from distill.teachers.factory import TeacherHandle


def run_recipe_factory(recipe: Recipe, teacher: TeacherHandle | None, progress: Progress) -> FactoryOutput:
    """Run (or resume) the recipe's factory with its teacher."""
    assert recipe.factory is not None
    if teacher is None:
        raise InputError("factory: the data factory needs a teacher section (the model that writes answers)")
    sampler = teacher_sampler(teacher, recipe.factory, progress=progress)
    return run_factory(
        recipe.factory,
        sampler,
        teacher.tokenizer,
        name=recipe.name,
        seed=recipe.seed,
        system_prompt=recipe.data.system_prompt,
        progress=progress,
    )


def method_view(cfg: MethodConfigBase) -> str:
    """Which factory data a method trains on (methods of other families of ideas: the kept traces)."""
    return str(getattr(cfg, "data_view", "verified"))


def view_stream(
    recipe: Recipe,
    out: FactoryOutput,
    cfg: MethodConfigBase,
    tokenizer: Any,
    kept: list[TokenizedExample],
    pad_id: int,
    seed: int,
) -> Stream:
    """The training stream of one method over its view of the factory's data."""
    d = recipe.data
    view = method_view(cfg)
    if view in ("pairs", "step_by_step"):
        if view == "pairs":
            pairs = pair_examples(out)
        else:
            pairs = step_by_step_pairs(
                verified_examples(out), getattr(cfg, "label_prefix", ""), getattr(cfg, "rationale_prefix", "")
            )
        tokenized, _ = tokenize_pairs(tokenizer, pairs, d.max_length, d.system_prompt)
        if not tokenized:
            raise InputError(
                f"{out.folder}: no usable {view} for method {cfg.display!r} (the factory kept none)"
            )
        return PairStream(tokenized, d.batch_size, pad_id, seed=seed, group_by_length=d.group_by_length)
    examples: list[Example] | None = None
    if view == "unfiltered":
        examples = unfiltered_examples(out)
    elif view == "shortest":
        examples = shortest_examples(out)
    if getattr(cfg, "chunked", False):
        rows = chunked_examples(
            tokenizer,
            examples if examples is not None else verified_examples(out),
            d.max_length,
            d.system_prompt,
            getattr(cfg, "chunk_by", "line"),
            getattr(cfg, "max_chunks", 8),
        )
    elif examples is not None:
        rows, _ = tokenize_examples(tokenizer, examples, d.max_length, d.system_prompt)
    else:
        rows = kept
    if not rows:
        raise InputError(f"{out.folder}: no usable {view} examples for method {cfg.display!r}")
    return BatchStream(
        rows,
        d.batch_size,
        pad_id,
        seed=seed,
        group_by_length=d.group_by_length,
        packing=d.packing,
        max_length=d.max_length,
    )


def evaluate_accuracy(
    recipe: Recipe,
    model: Any,
    tokenizer: Any,
    heldout: list[Example],
    cfg: MethodConfigBase | None,
    progress: Progress,
) -> dict[str, float]:
    """Held-out answer accuracy of one student (its method's task prefix applied, e.g. step-by-step's)."""
    assert recipe.factory is not None
    answers = answer_heldout(
        model,
        tokenizer,
        heldout,
        prefix=str(getattr(cfg, "eval_prefix", "")) if cfg is not None else "",
        max_new_tokens=recipe.factory.max_new_tokens,
        batch_size=recipe.eval.batch_size,
        system_prompt=recipe.data.system_prompt,
        allow_unisolated=recipe.factory.allow_unisolated,
        progress=progress,
    )
    return accuracy_metrics(answers)


def heldout_tasks(heldout: list[Example]) -> list[str]:
    return sorted({str(ex.meta.get("task", "all")) for ex in heldout})


def result_columns(heldout: list[Example]) -> list[dict[str, str]]:
    return accuracy_columns(heldout_tasks(heldout))


def results_note(recipe: Recipe, heldout: list[Example]) -> str:
    assert recipe.factory is not None
    return (
        f"answer accuracy on {len(heldout)} held-out task prompts (split off before the teacher wrote anything), "
        f"greedy, up to {recipe.factory.max_new_tokens} new tokens, scored by each task's verifier; "
        "'has answer': the share of answers with a final answer the verifier could read"
    )


def _pct(value: Any) -> str:
    return f"{100 * float(value):.1f} %" if isinstance(value, int | float) else "—"


def factory_sections(out: FactoryOutput) -> list[dict[str, Any]]:
    """The report's funnel table (generated → verified → deduplicated → kept, per task) and the
    contamination check."""
    manifest = out.manifest
    rows = funnel_rows(manifest)
    stages = [k for k in rows[0] if k != "task"] if rows else []
    table = [[str(r["task"]), *(str(r[s]) for s in stages)] for r in rows]
    text = (
        f"The teacher's samples and what survived each stage (folder `{out.folder}`). Drop reasons: "
        + ", ".join(f"{k} {v}" for k, v in sorted(((manifest.get("drops") or {}).get("total") or {}).items()))
        + "."
    )
    sections: list[dict[str, Any]] = [
        {"title": "Data factory", "text": text, "headers": ["task", *stages], "rows": table}
    ]
    teacher = manifest.get("teacher_heldout")  # {"total": {samples, correct, accuracy}, "tasks": {...}}
    if isinstance(teacher, dict) and isinstance(teacher.get("total"), dict):
        accuracy = _pct(teacher["total"].get("accuracy"))
        sections[0]["text"] += f" Teacher's own accuracy on its held-out samples: {accuracy}."
    report = manifest.get("contamination") or {}
    if report:
        sections.append(
            {
                "title": "Contamination check",
                "text": (
                    f"{report.get('contaminated', 0)} of {report.get('heldout_prompts', 0)} held-out prompts "
                    f"({_pct(report.get('fraction', 0))}) share most of their non-template "
                    f"{report.get('ngram')}-grams with the training prompts or kept answers; "
                    f"{report.get('exact_duplicates', 0)} are exact copies of a training prompt."
                ),
            }
        )
    return sections
