"""A whole run, from recipe to report, for any family: prepare once, train every method (and every seed)
from the same init with the same data and steps, evaluate before and after on held-out data, write the
report. Generation, evaluation and every write happen on the main process; all processes train.

Run folder layout:
  recipe.yaml            the resolved recipe
  methods/<label>/       metrics.jsonl, checkpoints/, student/, eval.json   (one seed)
  methods/<label>/seed-<s>/                                                 (several seeds)
  eval.json              before/after numbers of every method, timings
  report.md, report.html, *.png
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from distill.configs.base import MethodConfigBase
from distill.engine.accelerator import make_accelerator
from distill.engine.seeding import seed_everything
from distill.engine.trainer import TrainResult, train
from distill.errors import RecipeError
from distill.eval.report import write_report
from distill.families import FAMILIES
from distill.families.base import Family
from distill.io import write_json_atomic, write_text_atomic
from distill.progress import NullProgress, Progress
from distill.recipe import dump_recipe
from distill.recipe_base import RecipeBase
from distill.stats import summarise_seeds


def _check_resume(recipe: RecipeBase, run_dir: Path, resume: bool) -> None:
    saved = run_dir / "recipe.yaml"
    if resume and saved.exists() and saved.read_text(encoding="utf-8") != dump_recipe(recipe):
        raise RecipeError(f"--resume: the recipe differs from {saved}; resume with the same recipe")


def _history_figures(result: TrainResult) -> dict[str, Any]:
    hist = result.history
    if not hist:
        return {"final_loss": None, "step_seconds_median": None}
    out: dict[str, Any] = {
        "final_loss": hist[-1]["loss"],
        "step_seconds_median": sorted(h["step_seconds"] for h in hist)[len(hist) // 2],
    }
    if all("real_tokens" in h for h in hist):
        out["real_tokens_per_s"] = sum(h["real_tokens"] for h in hist) / sum(h["step_seconds"] for h in hist)
        out["padding_fraction"] = 1 - sum(h["real_tokens"] for h in hist) / max(
            1, sum(h["padded_slots"] for h in hist)
        )
    return out


def _train_one(
    family: Family,
    recipe: RecipeBase,
    cfg: MethodConfigBase,
    seed: int,
    method_dir: Path,
    acc: Accelerator,
    resume: bool,
    progress: Progress,
) -> dict[str, Any]:
    done_file = method_dir / "eval.json"
    if resume and done_file.exists():
        progress.log(f"{cfg.display} (seed {seed}): already finished, skipped")
        entry: dict[str, Any] = json.loads(done_file.read_text())
        return entry
    seed_everything(seed, recipe.train.deterministic)
    method = family.make_method(cfg, seed)
    stream = family.make_stream(method, seed)
    result = train(
        method=method, stream=stream, cfg=recipe.train, out_dir=method_dir, seed=seed,
        resume=resume, progress=progress, accelerator=acc,
    )  # fmt: skip
    t0 = time.perf_counter()
    after = family.evaluate(method, progress) if acc.is_main_process else None
    entry = {
        "method": cfg.model_dump(mode="json"),
        "seed": seed,
        "after": after,
        "steps": result.steps,
        "train_seconds": result.seconds,
        "eval_seconds": time.perf_counter() - t0,
        "resumed_from": result.resumed_from,
        "notes": result.notes,
        **_history_figures(result),
    }
    if acc.is_main_process:
        method.export(method_dir / "student")
        write_json_atomic(done_file, entry)
    acc.wait_for_everyone()
    return entry


def _combine_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    if len(per_seed) == 1:
        return next(iter(per_seed.values()))
    first = next(iter(per_seed.values()))
    afters = {str(s): e["after"] for s, e in per_seed.items() if e.get("after")}
    entry = {k: first[k] for k in ("method", "steps")}
    entry["seeds"] = {str(s): e for s, e in per_seed.items()}
    if len(afters) == len(per_seed):
        summary = summarise_seeds(afters)
        entry["after"], entry["after_interval"] = summary["mean"], summary["interval"]
    else:
        entry["after"] = None
    return entry


def run_recipe(
    recipe: RecipeBase, *, resume: bool = False, progress: Progress | None = None
) -> dict[str, Any]:
    """Run every method of the recipe (once per seed); return the summary written to eval.json."""
    t_start = time.perf_counter()
    recipe.preflight()
    family = FAMILIES.get(recipe.family)()
    run_dir = recipe.run_dir()
    acc = make_accelerator(recipe.train, run_dir)
    progress = (progress or NullProgress()) if acc.is_main_process else NullProgress()
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        _check_resume(recipe, run_dir, resume)
        write_text_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    seed_everything(recipe.seed, recipe.train.deterministic)

    family.prepare(recipe, acc, progress)
    timing = family.timings()
    summary_path = run_dir / "eval.json"
    previous = json.loads(summary_path.read_text()) if resume and summary_path.exists() else {}
    t0 = time.perf_counter()
    before = previous.get("before")
    if not before and recipe.eval.before and acc.is_main_process:
        before = family.evaluate(None, progress)
    timing["eval_before_s"] = time.perf_counter() - t0

    seeds = recipe.run_seeds()
    results: dict[str, Any] = {}
    for cfg in [recipe.method, *recipe.baselines]:
        per_seed: dict[int, dict[str, Any]] = {}
        for seed in seeds:
            method_dir = run_dir / "methods" / cfg.display
            if len(seeds) > 1:
                method_dir = method_dir / f"seed-{seed}"
            per_seed[seed] = _train_one(family, recipe, cfg, seed, method_dir, acc, resume, progress)
        results[cfg.display] = _combine_seeds(per_seed)
    family.close()

    timing["total_s"] = time.perf_counter() - t_start
    columns = family.result_columns()
    summary = {
        "name": recipe.name,
        "primary": recipe.method.display,
        **family.describe(),
        "seeds": seeds,
        **({"columns": columns, "results_note": family.results_note()} if columns else {}),
        "before": before,
        "methods": results,
        "timing": timing,
        "selection": "final step of each method; held-out data is never used for selection",
    }
    if acc.is_main_process:
        write_json_atomic(summary_path, summary)
        write_report(run_dir, summary, dump_recipe(recipe), family.figures(run_dir, summary))
    acc.wait_for_everyone()
    return summary
