"""`distill speculate`: how much a draft model (a pruned or distilled student) speeds up its target under
lossless speculative decoding, measured on real prompts.

The same prompts are decoded target-only and speculatively with the same settings and seeds, one prompt
at a time (the latency case), alternating the two per prompt and repeating the whole pass, so the
machine's drift hits both alike and the spread between repeats shows how noisy the timings are. The
report gives the acceptance rate (overall and per draft position), tokens per target call, the
draft/target cost ratio per forward, tokens/s of both and the speed-up, and for greedy decoding whether
the outputs were identical (they must be, up to float round-off flipping a near-tie)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from distill.configs.teachers import ModelConfig
from distill.errors import CompatibilityError, DistillError, InputError
from distill.generation.sampling import SamplingSpec
from distill.generation.speculative import (
    DecodeResult,
    PlainStats,
    eos_token_ids,
    generate_plain,
    generate_speculative,
)
from distill.generation.speculative_stats import SpeculativeStats, expected_speedup
from distill.io import write_json_atomic
from distill.paths import resolve_path
from distill.progress import NullProgress, Progress


def model_source(arg: str, field: str) -> ModelConfig:
    """A model argument as a source: a HF folder, a `.gguf` file, a folder holding one GGUF file, or any
    of these as `pkg:NAME[/sub]` (models shipped inside a Python package)."""
    try:
        path = resolve_path(arg)
    except DistillError as err:
        raise InputError(f"{field}: {err}") from None
    if path.suffix == ".gguf" and path.is_file():
        return ModelConfig(path=str(path.parent), gguf_file=path.name)
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelConfig(path=str(path), gguf_file=ggufs[0])
        if ggufs:
            raise InputError(f"{field}: {path} holds several GGUF files ({', '.join(ggufs)}); name one")
    if not path.exists():
        raise InputError(f"{field}: model not found: {path}")
    return ModelConfig(path=str(path))


def check_options(
    gamma: int, temperature: float, top_p: float, max_new_tokens: int, limit: int | None, repeats: int
) -> None:
    """Refuse bad settings before any model is loaded; each message names its option."""
    if gamma < 1:
        raise InputError(f"--gamma: must be at least 1 (draft tokens per round), got {gamma}")
    if temperature < 0:
        raise InputError(f"--temperature: must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"--top-p: must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens: must be at least 1, got {max_new_tokens}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit: must be at least 1, got {limit}")
    if repeats < 1:
        raise InputError(f"--repeats: must be at least 1, got {repeats}")


def read_prompts(path: str, tokenizer: Any, limit: int | None) -> list[list[int]]:
    """Prompt ids formatted with the chat template exactly as generation elsewhere in the project."""
    from distill.data.records import read_examples
    from distill.data.tokenize import prompt_ids

    try:
        examples = read_examples(path, limit)
    except InputError as err:
        raise InputError(f"--prompts: {err}") from None
    return [prompt_ids(tokenizer, ex.prompt, None) for ex in examples]


def load_pair(target: str, draft: str) -> tuple[Any, Any, int]:
    """Target and draft models and the vocabulary size both use; the tokenizers are compared first, so a
    foreign draft is refused before any weights are read."""
    from distill.models.loading import load_model, load_tokenizer, tokenizer_fingerprint

    sources = {"--target": model_source(target, "--target"), "--draft": model_source(draft, "--draft")}
    toks = {}
    for field, source in sources.items():
        try:
            toks[field] = load_tokenizer(source)
        except InputError as err:
            raise InputError(f"{field}: {err}") from None
    if tokenizer_fingerprint(toks["--target"]) != tokenizer_fingerprint(toks["--draft"]):
        raise CompatibilityError(
            "--draft: its tokenizer differs from the target's (vocabulary content mismatch); speculative "
            "decoding needs one vocabulary: use a draft built from the target (a pruned or distilled student)"
        )
    loaded = {}
    for field, source in sources.items():
        try:
            loaded[field] = load_model(source)
        except InputError as err:
            raise InputError(f"{field}: {err}") from None
    vocab = len(toks["--target"])
    for field, item in loaded.items():
        head = item.model.get_output_embeddings()
        if head is None or int(head.weight.shape[0]) < vocab:
            raise CompatibilityError(f"{field}: its LM head is smaller than the tokenizer ({vocab} tokens)")
    return loaded["--target"], loaded["--draft"], vocab


def load_feature_pair(target: str, draft: Path) -> tuple[Any, Any, int]:
    """The target, a feature drafter (a `feature_drafter` export: drafter.json + weights, rebuilt around
    the target) and the vocabulary size; a drafter trained for another target is refused naming --draft."""
    from distill.models.feature_drafter import load_drafter
    from distill.models.loading import load_model

    try:
        tgt = load_model(model_source(target, "--target"))
    except InputError as err:
        raise InputError(f"--target: {err}") from None
    drafter = load_drafter(draft, tgt.model, tgt.tokenizer, field="--draft")
    return tgt, drafter, len(tgt.tokenizer)


def is_feature_drafter(draft: str) -> Path | None:
    """The folder of `draft` when it holds a feature drafter (drafter.json), else None."""
    from distill.models.feature_drafter import is_drafter_folder

    try:
        path = resolve_path(draft)
    except DistillError:
        return None
    return path if path.is_dir() and is_drafter_folder(path) else None


def _generator(model: PreTrainedModel, seed: int) -> torch.Generator:
    return torch.Generator(device=next(model.parameters()).device).manual_seed(seed)


def _ratio(a: float, b: float) -> float:
    """a / b, 0 where nothing was timed (a one-token budget runs no target-only decode step)."""
    return a / b if b else 0.0


def measure(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    prompts: list[list[int]],
    spec: SamplingSpec,
    *,
    gamma: int,
    max_new_tokens: int,
    seed: int,
    adaptive: bool,
    repeats: int,
    eos: set[int],
    vocab: int,
    progress: Progress,
    decoder: Callable[..., DecodeResult] = generate_speculative,
) -> dict[str, Any]:
    """Decode every prompt target-only and speculatively (alternating per prompt), `repeats` times; the
    numbers of the report. Prompt i is sampled with seed `seed + i` by both decoders in every repeat.
    `decoder` is the speculative decoder (`generate_speculative`, or the feature drafter's)."""
    kwargs: dict[str, Any] = {"eos_ids": eos, "vocab": vocab}
    # warm-up: first calls pay one-time costs (allocations, kernels) that belong to neither decoder
    generate_plain(target, prompts[:1], spec, 4, generator=_generator(target, seed), **kwargs)
    decoder(target, draft, prompts[:1], spec, 4, gamma=gamma, generator=_generator(target, seed), **kwargs)
    runs: list[dict[str, Any]] = []
    first: tuple[list[list[int]], list[list[int]], SpeculativeStats] | None = None
    progress.start("speculate", repeats * len(prompts))
    for _ in range(repeats):
        plain, spec_stats = PlainStats(), SpeculativeStats()
        plain_out, spec_out = [], []
        for i, ids in enumerate(prompts):
            a = generate_plain(
                target, [ids], spec, max_new_tokens, generator=_generator(target, seed + i), **kwargs
            )
            b = decoder(
                target,
                draft,
                [ids],
                spec,
                max_new_tokens,
                gamma=gamma,
                adaptive=adaptive,
                generator=_generator(target, seed + i),
                **kwargs,
            )
            plain.merge(a.stats)
            spec_stats.merge(b.stats)
            plain_out.append(a.tokens[0])
            spec_out.append(b.tokens[0])
            progress.advance(1, f"alpha {spec_stats.alpha:.2f}")
        if first is None:
            first = (plain_out, spec_out, spec_stats)
        draft_per_call = spec_stats.draft_forward_seconds / max(spec_stats.draft_step_calls, 1)
        target_per_call = plain.decode_seconds / max(plain.decode_calls, 1)
        verify_per_call = spec_stats.verify_seconds / max(spec_stats.verify_calls, 1)
        plain_tps = plain.new_tokens / plain.total_seconds
        spec_tps = spec_stats.new_tokens / spec_stats.total_seconds
        runs.append(
            {
                "target_only_tokens_per_s": plain_tps,
                "speculative_tokens_per_s": spec_tps,
                "speedup": spec_tps / plain_tps,
                "draft_seconds_per_forward": draft_per_call,
                "target_seconds_per_forward": target_per_call,
                "cost_ratio": _ratio(draft_per_call, target_per_call),
                "verify_cost_ratio": _ratio(verify_per_call, target_per_call),
                "target_only": plain.to_dict(),
                "speculative": spec_stats.to_dict(),
            }
        )
    progress.finish()
    assert first is not None
    plain_out, spec_out, stats = first
    return _summary(runs, stats, plain_out, spec_out, spec, gamma)


def _spread(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = [float(r[key]) for r in runs]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _summary(
    runs: list[dict[str, Any]],
    stats: SpeculativeStats,
    plain_out: list[list[int]],
    spec_out: list[list[int]],
    spec: SamplingSpec,
    gamma: int,
) -> dict[str, Any]:
    cost, verify = _spread(runs, "cost_ratio"), _spread(runs, "verify_cost_ratio")
    mean_gamma = sum(stats.gammas) / len(stats.gammas) if stats.gammas else float(gamma)
    same = sum(a == b for a, b in zip(plain_out, spec_out, strict=True))
    return {
        "alpha": stats.alpha,
        "alpha_judged": stats.alpha_judged,
        "alpha_per_position": stats.alpha_per_position,
        "tokens_per_target_call": stats.tokens_per_target_call,
        "mean_gamma": mean_gamma,
        "cost_ratio": cost,
        "target_only_tokens_per_s": _spread(runs, "target_only_tokens_per_s"),
        "speculative_tokens_per_s": _spread(runs, "speculative_tokens_per_s"),
        "speedup": _spread(runs, "speedup"),
        "predicted_speedup": expected_speedup(stats.alpha_judged, round(mean_gamma), cost["median"]),
        # Leviathan et al. price a verifying call as one target step; on a CPU it runs gamma + 1 tokens at
        # a measured multiple of that: with it, the speed-up the measured acceptance and costs allow
        "verify_cost_ratio": verify,
        "predicted_speedup_measured_costs": _ratio(
            stats.tokens_per_target_call, verify["median"] + mean_gamma * cost["median"]
        ),
        "greedy": spec.greedy,
        "identical_outputs": same if spec.greedy else None,
        "prompts": len(plain_out),
        "new_tokens": {"target_only": sum(map(len, plain_out)), "speculative": sum(map(len, spec_out))},
        "stats": stats.to_dict(),
        "repeats": runs,
    }


def speculate(
    target: str,
    draft: str,
    prompts: str,
    *,
    gamma: int = 4,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    limit: int | None = None,
    seed: int = 0,
    adaptive: bool = False,
    repeats: int = 3,
    json_out: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The whole command: check, load, measure, optionally write the JSON report; returns the report."""
    check_options(gamma, temperature, top_p, max_new_tokens, limit, repeats)
    if not resolve_path(prompts).exists():
        raise InputError(f"--prompts: file not found: {resolve_path(prompts)}")
    progress = progress or NullProgress()
    progress.log("loading target and draft")
    feature_folder = is_feature_drafter(draft)
    decoder: Callable[..., DecodeResult] = generate_speculative
    if feature_folder is not None:
        from distill.generation.feature_speculative import generate_feature_speculative

        tgt, draft_model, vocab = load_feature_pair(target, feature_folder)
        draft_source, decoder = str(feature_folder), generate_feature_speculative
    else:
        tgt, drf, vocab = load_pair(target, draft)
        draft_model, draft_source = drf.model, drf.source
    ids = read_prompts(prompts, tgt.tokenizer, limit)
    spec = SamplingSpec(temperature=temperature, top_p=top_p)
    report = measure(
        tgt.model,
        draft_model,
        ids,
        spec,
        gamma=gamma,
        max_new_tokens=max_new_tokens,
        seed=seed,
        adaptive=adaptive,
        repeats=repeats,
        eos=eos_token_ids(tgt.model, tgt.tokenizer),
        vocab=vocab,
        progress=progress,
        decoder=decoder,
    )
    report["settings"] = {
        "target": tgt.source,
        "draft": draft_source,
        "draft_kind": "feature" if feature_folder is not None else "model",
        "draft_vocab": getattr(draft_model, "draft_vocab", None),
        "gamma": gamma,
        "adaptive_gamma": adaptive,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "target_parameters": sum(p.numel() for p in tgt.model.parameters()),
        "draft_parameters": sum(p.numel() for p in draft_model.parameters()),
    }
    if json_out is not None:
        write_json_atomic(json_out, report)
    return report


def _fmt(spread: dict[str, float], digits: int = 1, unit: str = "") -> str:
    return f"{spread['median']:.{digits}f}{unit} (min {spread['min']:.{digits}f}, max {spread['max']:.{digits}f})"


def _draft_kind(settings: dict[str, Any]) -> str:
    if settings.get("draft_kind") != "feature":
        return ""
    k = settings.get("draft_vocab")
    return ", feature drafter" + (f" over {k} draft ids" if k else "")


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report for people, a few lines."""
    s = report["settings"]
    sampling = "greedy" if report["greedy"] else f"temperature {s['temperature']:g}, top-p {s['top_p']:g}"
    per_pos = " ".join("-" if a is None else f"{a:.2f}" for a in report["alpha_per_position"])
    repeats = s["repeats"]
    lines = [
        f"target {s['target']} ({s['target_parameters'] / 1e6:.1f} M), "
        f"draft {s['draft']} ({s['draft_parameters'] / 1e6:.1f} M{_draft_kind(s)})",
        f"{report['prompts']} prompts, {sampling}, gamma {s['gamma']}{' adaptive' if s['adaptive_gamma'] else ''}"
        f" (mean {report['mean_gamma']:.2f}), max {s['max_new_tokens']} new tokens, {repeats} repeat(s)",
        f"acceptance alpha {report['alpha']:.3f} (of judged drafts {report['alpha_judged']:.3f}); "
        f"per position {per_pos}",
        f"tokens per target call {report['tokens_per_target_call']:.2f}",
        f"draft/target cost ratio {_fmt(report['cost_ratio'], 3)}; a verifying call costs "
        f"{_fmt(report['verify_cost_ratio'], 2)} target-only steps",
        f"tokens/s: target-only {_fmt(report['target_only_tokens_per_s'])}, "
        f"speculative {_fmt(report['speculative_tokens_per_s'])}",
        f"speed-up {_fmt(report['speedup'], 2, 'x')} over {repeats} repeat(s); "
        f"predicted from alpha and cost {report['predicted_speedup']:.2f}x "
        f"({report['predicted_speedup_measured_costs']:.2f}x with the measured verify cost)",
    ]
    if report["greedy"]:
        n, same = report["prompts"], report["identical_outputs"]
        lines.append(f"greedy outputs identical: {'yes' if same == n else 'NO'} ({same}/{n} prompts)")
    return lines
