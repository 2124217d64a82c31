"""The `distill` command. The only place that parses arguments and prints for people: everything below
raises typed errors, turned here into one line on stderr and exit code 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from distill.cli_progress import RichProgress, console
from distill.errors import DistillError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Distil a teacher model into a smaller student."
)
out = Console()

SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a recipe field: a.b.c=value (repeatable).")
]


def _print_summary(summary: dict) -> None:  # type: ignore[type-arg]
    from distill.eval.report_text import summary_lines

    seeds = summary.get("seeds") or []
    title = f"held-out results: {summary.get('name')}"
    if len(seeds) > 1:
        title += f" (mean ± half-width of the 95 % t interval over seeds {seeds})"
    out.print(title, markup=False, highlight=False, soft_wrap=True)
    for line in summary_lines(summary):
        out.print(line, markup=False, highlight=False, soft_wrap=True)


def _is_main_process() -> bool:
    """Under torchrun / accelerate launch every process runs the CLI; only rank 0 prints results."""
    return os.environ.get("RANK", "0") == "0"


def _run(recipe_name: str, overrides: list[str] | None, resume: bool) -> None:
    from distill.pipeline import run_recipe
    from distill.recipe import load_recipe

    recipe = load_recipe(recipe_name, overrides)
    progress = RichProgress()
    try:
        summary = run_recipe(recipe, resume=resume, progress=progress)
    finally:
        progress.finish()
    if _is_main_process():
        _print_summary(summary)
        run_dir = recipe.run_dir()
        out.print(
            f"report: {run_dir / 'report.md'} (and report.html); total {summary['timing']['total_s']:.0f} s",
            soft_wrap=True,
        )


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file or built-in recipe name.")],
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoints.")] = False,
) -> None:
    """Run a recipe: generate data, train every method, evaluate, write the report."""
    _run(recipe, set_, resume)


@app.command()
def quickstart(
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume")] = False,
) -> None:
    """Distil SmolLM2-135M-Instruct into a 6-layer pruned copy (logit_kd vs the seq_kd baseline)."""
    _run("quickstart", set_, resume)


@app.command()
def validate(recipe: str, set_: SetOpt = None) -> None:
    """Check a recipe and that its files exist, without loading any model."""
    from distill.recipe import load_recipe

    r = load_recipe(recipe, set_)
    r.preflight()
    out.print(f"ok: {recipe} (method {r.method.name}, {len(r.baselines)} baseline(s), {r.train.steps} steps)")


@app.command()
def recipes() -> None:
    """List built-in recipes."""
    import yaml

    from distill.recipe import builtin_recipes

    table = Table(title="built-in recipes")
    table.add_column("name")
    table.add_column("description")
    for name, path in builtin_recipes().items():
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        table.add_row(name, str(data.get("description", "")))
    out.print(table)


@app.command("eval")
def eval_cmd(
    recipe: str,
    student: Annotated[Path, typer.Option("--student", help="A saved student folder.")],
    output: Annotated[Path | None, typer.Option("--output", help="Where to write eval.json.")] = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate a saved student against the recipe's teacher on held-out data, or a saved distilled set
    (a dataset-distillation recipe) with the recipe's protocol."""
    from distill.recipe import CondenseRecipe, lm_recipe, load_recipe
    from distill.stages import evaluate_saved

    loaded = load_recipe(recipe, set_)
    if isinstance(loaded, CondenseRecipe):
        from distill.families.condense import evaluate_saved_set

        progress = RichProgress()
        try:
            result, path = evaluate_saved_set(loaded, student, output, progress)
        finally:
            progress.finish()
        _print_summary(
            {"name": str(student), "columns": result.pop("columns"), "methods": {"set": {"after": result}}}
        )
        out.print(f"wrote {path}")
        return
    r = lm_recipe(loaded, "eval")
    progress = RichProgress()
    try:
        result, path = evaluate_saved(r, student, output, progress)
    finally:
        progress.finish()
    _print_summary({"name": str(student), "methods": {"student": {"after": result}}})
    out.print(f"wrote {path}")


@app.command()
def generate(
    recipe: str,
    input_: Annotated[str, typer.Option("--input", help="JSONL/Parquet of prompts (or messages).")],
    output: Annotated[
        Path, typer.Option("--output", help="JSONL of chat messages with the teacher's answers.")
    ],
    set_: SetOpt = None,
) -> None:
    """Let the recipe's teacher answer every prompt (sequence-KD data); written atomically."""
    from distill.recipe import lm_recipe, load_recipe
    from distill.stages import generate_file

    r = lm_recipe(load_recipe(recipe, set_), "generate")
    progress = RichProgress()
    try:
        n = generate_file(r, input_, output, progress)
    finally:
        progress.finish()
    out.print(f"wrote {n} answers to {output}")


@app.command()
def factory(recipe: str, set_: SetOpt = None) -> None:
    """Run (or resume) the recipe's data factory alone: teacher samples, verified, deduplicated, filtered;
    prints the funnel per task."""
    from distill.recipe import lm_recipe, load_recipe
    from distill.stages import run_factory_stage

    r = lm_recipe(load_recipe(recipe, set_), "factory")
    progress = RichProgress()
    try:
        folder, rows = run_factory_stage(r, progress)
    finally:
        progress.finish()
    table = Table("task", *[k for k in rows[0] if k != "task"])
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    out.print(table)
    out.print(f"wrote {folder}")


@app.command()
def cache(recipe: str, set_: SetOpt = None) -> None:
    """Run the teacher once over the training data and store its top-k log-probs (resumable)."""
    from distill.recipe import lm_recipe, load_recipe
    from distill.stages import cache_teacher

    r = lm_recipe(load_recipe(recipe, set_), "cache")
    progress = RichProgress()
    try:
        info = cache_teacher(r, progress)
    finally:
        progress.finish()
    out.print(f"cache: {info['path']} ({info['tokens']} tokens, {info['bytes_per_token']:.1f} bytes/token)")


@app.command()
def prune(
    recipe: str,
    output: Annotated[Path, typer.Option("--output", help="Where to save the pruned student.")],
    set_: SetOpt = None,
) -> None:
    """Prune the teacher into the recipe's student (depth, width by activation importance) and save it."""
    from distill.recipe import lm_recipe, load_recipe
    from distill.stages import prune_to_folder

    r = lm_recipe(load_recipe(recipe, set_), "prune")
    progress = RichProgress()
    try:
        info = prune_to_folder(r, output, progress)
    finally:
        progress.finish()
    out.print(
        f"pruned student: {output} ({info['parameters'] / 1e6:.1f} M parameters, layers {info['kept_layers']})"
    )


@app.command()
def sample(
    folder: Annotated[Path, typer.Argument(help="A saved diffusion model (teacher model/, student/).")],
    output: Annotated[Path, typer.Option("--out", help=".npy, .safetensors, .png (2-D), PNG folder.")],
    steps: Annotated[int | None, typer.Option("--steps", help="Default: the folder's.")] = None,
    count: Annotated[int, typer.Option("--count", help="How many samples.")] = 16,
    label: Annotated[int | None, typer.Option("--label", help="Default: classes in turn.")] = None,
    guidance: Annotated[float | None, typer.Option("--guidance", help="CFG scale.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the starting noise.")] = 0,
    sampler: Annotated[str | None, typer.Option("--sampler", help="ode, heun or consistency.")] = None,
) -> None:
    """Draw samples from a saved diffusion teacher or distilled student."""
    from distill.diffusion.sample_command import sample_folder

    message = sample_folder(
        folder, output, steps=steps, count=count, label=label, guidance=guidance, seed=seed, sampler=sampler
    )
    out.print(message, soft_wrap=True, highlight=False)


@app.command()
def speculate(
    target: Annotated[str, typer.Option("--target", help="Target: HF folder, .gguf file or pkg:NAME.")],
    draft: Annotated[
        str,
        typer.Option(
            "--draft",
            help="Draft model with the target's tokenizer, or a feature-drafter folder (drafter.json).",
        ),
    ],
    prompts: Annotated[str, typer.Option("--prompts", help="JSONL with a 'prompt' field.")],
    gamma: Annotated[int, typer.Option("--gamma", help="Draft tokens per round.")] = 4,
    temperature: Annotated[float, typer.Option("--temperature", help="0: greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 64,
    limit: Annotated[int | None, typer.Option("--limit", help="Use the first N prompts.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    adaptive_gamma: Annotated[bool, typer.Option("--adaptive-gamma", help="Gamma in [1, 2*gamma].")] = False,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed passes (noise shows).")] = 3,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report here.")] = None,
) -> None:
    """Measure lossless speculative decoding of a target with a draft (a pruned or distilled student)."""
    from distill.generation.speculate_command import report_lines
    from distill.generation.speculate_command import speculate as run_speculate

    progress = RichProgress()
    try:
        report = run_speculate(
            target,
            draft,
            prompts,
            gamma=gamma,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            limit=limit,
            seed=seed,
            adaptive=adaptive_gamma,
            repeats=repeats,
            json_out=json_out,
            progress=progress,
        )
    finally:
        progress.finish()
    for line in report_lines(report):
        out.print(line, soft_wrap=True, highlight=False, markup=False)


# Set before transformers, huggingface_hub, datasets or tqdm is imported (each reads these once, at import):
# distill loads local models only, and draws its own progress, which library bars would interleave with.
_LIBRARY_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}
_BARS_OFF = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}


def _configure_libraries() -> None:
    """Quiet the libraries for this process (the CLI owns it; library code changes no global state).
    Library progress bars are off; a user's own setting wins on a terminal, but never in a log file or
    pipe, where a bar's carriage returns become thousands of lines (the GGUF de-quantisation bar)."""
    for key, value in _LIBRARY_ENV.items():
        os.environ.setdefault(key, value)
    terminal = sys.stderr.isatty()
    for key, value in _BARS_OFF.items():
        if terminal:
            os.environ.setdefault(key, value)
        else:
            os.environ[key] = value


def main() -> None:
    """The `distill` entry point: configure the libraries, run the command, turn typed errors into one line."""
    _configure_libraries()
    try:
        app(standalone_mode=False)
    except DistillError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as err:  # click usage errors and the like carry their own exit code
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
