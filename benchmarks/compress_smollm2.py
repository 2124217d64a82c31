#!/usr/bin/env python
"""LLM compression on the quickstart pair (SmolLM2-135M-Instruct teacher, its generated answers).

    python benchmarks/compress_smollm2.py --part prune      # importance vs random width pruning, no training
    python benchmarks/compress_smollm2.py --part recover    # hidden-state + logit KD vs logit KD, 3 seeds
    python benchmarks/compress_smollm2.py --part qad        # int4 QAD vs KD then PTQ, 3 seeds
    python benchmarks/compress_smollm2.py --part lora       # LoRA r=16 vs full student, 1 seed
    python benchmarks/compress_smollm2.py --report docs/benchmarks/compress.md   # tables from saved parts

Every number is held-out next-token KL(teacher || student) per answer token on the quickstart held-out
prompts (the teacher's greedy answers), from the last training step; nothing is selected on held-out
data. Seeds change the batch order; the pruned initialisation is the same for every seed (random ranking
takes the seed instead). Intervals: mean [95 % Student-t] over seeds; paired differences per seed.
Each part saves its raw results under runs/bench/compress/<part>.json; `--report` renders the tables.
"""

# ruff: noqa: E402 - the OpenMP setting below must precede the first torch import
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from distill.io import write_json_atomic
from distill.pipeline import run_recipe
from distill.progress import NullProgress, Progress
from distill.recipe import Recipe, builtin_recipes, parse_recipe
from distill.stats import mean_interval
from report_output import emit

OUT = Path("runs/bench/compress")
WIDTH = {"hidden_size": 384, "intermediate_size": 768, "num_attention_heads": 6, "num_key_value_heads": 3}


class Log(Progress):
    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def base(name: str, steps: int, seeds: list[int], **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(builtin_recipes()["quickstart"].read_text())
    data.update(name=name, output_dir=str(OUT / name), seeds=seeds, baselines=[])
    data["train"]["steps"] = steps
    data["train"]["warmup_steps"] = max(1, steps // 10)
    data.update(changes)
    return data


def pruned(ranking: str = "importance", depth: str = "even", width: bool = True) -> dict[str, Any]:
    prune: dict[str, Any] = {"keep_layers": 6, "depth": depth, "ranking": ranking}
    if width:
        prune["width"] = dict(WIDTH)
    return {"init": "prune", "prune": prune}


def kl_per_seed(summary: dict[str, Any], label: str) -> list[float]:
    entry = summary["methods"][label]
    if "seeds" in entry:
        return [float(e["after"]["kl"]) for e in entry["seeds"].values()]
    return [float(entry["after"]["kl"])]


def part_prune(args: argparse.Namespace) -> dict[str, Any]:
    """Held-out KL of pruned students before any training, 6 of 30 blocks: width by importance vs at
    random (one random ranking per seed), depth evenly spaced vs by block importance."""
    variants: list[tuple[str, dict[str, Any], int]] = [("depth only (6 even)", pruned(width=False), 0)]
    variants += [("width by importance, depth even", pruned("importance"), 0)]
    variants += [(f"width at random (seed {s}), depth even", pruned("random"), s) for s in args.seeds]
    variants += [("width + depth by importance", pruned("importance", "importance"), 0)]
    return evaluate_pruned(variants)


def part_prune_width(args: argparse.Namespace) -> dict[str, Any]:
    """The same widths with all 30 blocks kept: width pruning alone, importance vs random."""
    full = {"init": "prune", "prune": {"width": dict(WIDTH)}}
    variants: list[tuple[str, dict[str, Any], int]] = [("all 30 blocks, width by importance", full, 0)]
    for s in args.seeds:
        random = {"init": "prune", "prune": {"width": dict(WIDTH), "ranking": "random"}}
        variants.append((f"all 30 blocks, width at random (seed {s})", random, s))
    return evaluate_pruned(variants)


def evaluate_pruned(variants: list[tuple[str, dict[str, Any], int]]) -> dict[str, Any]:
    from accelerate import Accelerator

    from distill.families.lm import LMFamily

    rows: dict[str, Any] = {}
    for label, student, seed in variants:
        recipe = parse_recipe(base("prune", 1, [seed], student=student, seed=seed))
        assert isinstance(recipe, Recipe)
        family = LMFamily()
        t0 = time.perf_counter()
        family.prepare(recipe, Accelerator(cpu=True), Log())
        result = family.evaluate(None, NullProgress())
        assert result is not None
        info = family.prep.student_info
        rows[label] = {
            "kl": result["kl"],
            "top1": result["top1_agreement"],
            "parameters": info["parameters"],
            "kept_layers": info["kept_layers"],
            "seconds": time.perf_counter() - t0,
        }
        print(label, rows[label], flush=True)
        family.close()
    return rows


def part_recover(args: argparse.Namespace) -> dict[str, Any]:
    """The depth + width-pruned student recovered with logit KD alone vs hidden-state + logit KD."""
    hidden = {
        "name": "representation_kd",
        "label": "hidden+logit",
        "hidden": {"layers": "all", "loss": args.hidden_loss, "weight": args.hidden_weight},
    }
    baselines: list[dict[str, Any]] = [{"name": "logit_kd"}]
    if args.relations:
        baselines.append(
            {
                "name": "representation_kd",
                "label": "hidden+relations+logit",
                "hidden": hidden["hidden"],
                "relations": {"kinds": ["query", "key", "value"]},
            }
        )
    data = base("recover", args.steps, args.seeds, student=pruned(), method=hidden, baselines=baselines)
    summary = run_recipe(parse_recipe(data), resume=args.resume, progress=Log())
    return {
        "before": summary["before"]["kl"],
        "student": summary["student"],
        "kl": {label: kl_per_seed(summary, label) for label in summary["methods"]},
    }


def part_qad(args: argparse.Namespace) -> dict[str, Any]:
    """The quickstart's 6-block student, int4 with groups of 32: trained fake-quantized (QAD) vs trained in
    full precision and rounded after (PTQ), same steps, seeds and data."""
    quant = {"bits": 4, "group_size": 32}
    method = {"name": "logit_kd", "label": "qad", "quantize": {**quant, "mode": "qat"}}
    baselines = [{"name": "logit_kd", "label": "kd+ptq", "quantize": {**quant, "mode": "ptq"}}]
    if args.float_reference:
        baselines.append({"name": "logit_kd", "label": "kd (float)"})
    name = "qad" + (f"-{args.tag}" if args.tag else "")
    data = base(name, args.steps, args.seeds, student=pruned(width=False), method=method, baselines=baselines)
    summary = run_recipe(parse_recipe(data), resume=args.resume, progress=Log())
    return {
        "before": summary["before"]["kl"],
        "kl": {label: kl_per_seed(summary, label) for label in summary["methods"]},
    }


def optimizer_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """Trainable parameters and the bytes AdamW keeps for them after one step."""
    from distill.engine.optim import make_adamw
    from distill.models.lora import trainable_state_bytes

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = make_adamw(params, {"lr": 0.0, "betas": (0.9, 0.999), "weight_decay": 0.0})
    opt.step()
    for p in params:
        p.grad = None
    return sum(p.numel() for p in params), trainable_state_bytes(opt)


def part_lora(args: argparse.Namespace) -> dict[str, Any]:
    """LoRA r=16 on the 6-block student vs the full student: trainable parameters, optimizer memory,
    time per step, held-out KL; and the merged export loaded with from_pretrained against the trained,
    unmerged model."""
    from distill.engine.accelerator import make_accelerator
    from distill.engine.seeding import seed_everything
    from distill.engine.trainer import train
    from distill.families.lm import LMFamily
    from distill.methods.lm.base import LMMethod

    rows: dict[str, Any] = {}
    lora = {**pruned(width=False), "lora": {"r": 16, "alpha": 32}}
    for label, student in (("full", pruned(width=False)), ("lora r=16", lora)):
        name = "lora" if "lora" in student else "full"
        recipe = parse_recipe(
            base(name, args.steps, args.seeds[:1], student=student, method={"name": "logit_kd"})
        )
        assert isinstance(recipe, Recipe)
        seed, folder = args.seeds[0], recipe.run_dir()
        acc = make_accelerator(recipe.train, folder)
        family = LMFamily()
        family.prepare(recipe, acc, Log())
        seed_everything(seed, recipe.train.deterministic)
        method = family.make_method(recipe.method, seed)
        assert isinstance(method, LMMethod)
        trainable, state = optimizer_bytes(copy.deepcopy(method.body.lm))
        result = train(
            method=method,
            stream=family.make_stream(method, seed),
            cfg=recipe.train,
            out_dir=folder,
            seed=seed,
            resume=False,
            progress=Log(),
            accelerator=acc,
        )
        after = family.evaluate(method, NullProgress())
        assert after is not None
        method.export(folder / "student")
        rows[label] = {
            "kl": after["kl"],
            "trainable": trainable,
            "optimizer_bytes": state,
            "parameters": sum(p.numel() for n, p in method.body.lm.named_parameters() if "lora_" not in n),
            "seconds_per_step": result.seconds / result.steps,
        }
        if name == "lora":
            rows[label]["merged_max_abs_diff"] = merged_difference(method.body.lm, folder / "student", family)
        family.close()
        print(label, rows[label], flush=True)
    return rows


def part_lora_merge(args: argparse.Namespace) -> dict[str, Any]:
    """Where the merged export's logit difference comes from: the 6-block student with r=16 adapters
    (B drawn at the scale training leaves, std 0.01), merged vs unmerged on held-out sequences, in float32
    and float64, next to the largest |logit|."""
    from accelerate import Accelerator

    from distill.families.lm import LMFamily
    from distill.models.lora import merged_copy

    recipe = parse_recipe(base("lora-merge", 1, [0], student={**pruned(width=False), "lora": {"r": 16}}))
    assert isinstance(recipe, Recipe)
    family = LMFamily()
    family.prepare(recipe, Accelerator(cpu=True), Log())
    model = family.prep.student
    assert model is not None
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    rows: dict[str, Any] = {}
    for dtype in (torch.float32, torch.float64):
        unmerged = copy.deepcopy(model).to(dtype).eval()
        merged = merged_copy(unmerged).eval()
        worst, scale = 0.0, 0.0
        with torch.no_grad():
            for ex in family.prep.eval[:16]:
                ids = torch.tensor([ex.input_ids])
                a, b = merged(ids).logits, unmerged(ids).logits
                worst, scale = max(worst, float((a - b).abs().max())), max(scale, float(b.abs().max()))
        rows[str(dtype).removeprefix("torch.")] = {"max_abs_diff": worst, "max_abs_logit": scale}
    family.close()
    print(rows, flush=True)
    return rows


def merged_difference(unmerged: torch.nn.Module, folder: Path, family: Any) -> float:
    """Max |logit difference| over held-out sequences between the exported folder (from_pretrained) and
    the model that was trained."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    unmerged.eval()
    worst = 0.0
    with torch.no_grad():
        for ex in family.prep.eval[:16]:
            ids = torch.tensor([ex.input_ids])
            worst = max(worst, float((merged(ids).logits - unmerged(ids).logits).abs().max()))
    return worst


def fmt(values: list[float]) -> str:
    mean, low, high = mean_interval(values)
    return f"{mean:.4f}" if len(values) < 2 else f"{mean:.4f} [{low:.4f}, {high:.4f}]"


def paired(a: list[float], b: list[float]) -> str:
    return fmt([x - y for x, y in zip(a, b, strict=True)])


def report(path: Path | None) -> None:
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    lines = [
        "# LLM compression on the quickstart pair",
        "",
        "Held-out KL(teacher || student) per answer token, last step; `python benchmarks/compress_smollm2.py`.",
        "",
    ]
    for part in ("prune", "prune_width"):
        if part not in parts:
            continue
        lines += [f"## Pruning before recovery (no training): `--part {part}`", ""]
        lines += [
            "| student | parameters | kept blocks | held-out KL | top-1 agreement |",
            "|---|---|---|---|---|",
        ]
        for label, r in parts[part].items():
            blocks = r["kept_layers"] if len(r["kept_layers"]) < 30 else "all 30"
            lines.append(
                f"| {label} | {r['parameters'] / 1e6:.1f} M | {blocks} | {r['kl']:.4f} | {r['top1']:.3f} |"
            )
        rand = [r["kl"] for k, r in parts[part].items() if "random" in k]
        if rand:
            lines += ["", f"Random width ranking, {len(rand)} seeds: {fmt(rand)} (min {min(rand):.4f}).", ""]
    if "recover" in parts:
        r = parts["recover"]
        lines += [
            "## Recovery of the depth + width-pruned student",
            "",
            f"Before training: KL {r['before']:.4f}.",
            "",
            "| method | held-out KL |",
            "|---|---|",
        ]
        lines += [f"| {label} | {fmt(v)} |" for label, v in r["kl"].items()]
        base_kl = r["kl"].get("logit_kd")
        others = [label for label in r["kl"] if label != "logit_kd"]
        if base_kl is not None and others:
            lines += ["", "Paired per seed against logit KD alone (negative: lower KL):", ""]
            lines += [f"- ({label}) - (logit_kd): {paired(r['kl'][label], base_kl)}" for label in others]
            lines += [""]
    qad = [p for name, p in parts.items() if name == "qad" or name.startswith("qad-")]
    if qad:  # extra seeds run under --tag land in their own part; their per-seed values join the table
        r = {"kl": {label: [v for p in qad for v in p["kl"][label]] for label in qad[0]["kl"]}}
        lines += [
            "## Quantization-aware distillation (int4, groups of 32)",
            "",
            "| method | held-out KL |",
            "|---|---|",
        ]
        lines += [f"| {label} | {fmt(v)} |" for label, v in r["kl"].items()]
        lines += ["", f"Paired QAD - (KD then PTQ): {paired(r['kl']['qad'], r['kl']['kd+ptq'])}.", ""]
    if "lora" in parts:
        lines += [
            "## LoRA student (r = 16) vs the full student",
            "",
            "| student | trainable parameters | AdamW state | s/step | held-out KL |",
            "|---|---|---|---|---|",
        ]
        for label, r in parts["lora"].items():
            lines.append(
                f"| {label} | {r['trainable'] / 1e6:.2f} M of {r['parameters'] / 1e6:.1f} M | "
                f"{r['optimizer_bytes'] / 2**20:.1f} MiB | {r['seconds_per_step']:.2f} | {r['kl']:.4f} |"
            )
        diff = parts["lora"].get("lora r=16", {}).get("merged_max_abs_diff")
        for dtype, m in parts.get("lora_merge", {}).items():
            lines += [
                "",
                f"Merge check in {dtype} (adapters B ~ N(0, 0.01), no training): max |logit difference| "
                f"{m['max_abs_diff']:.2e}, largest |logit| {m['max_abs_logit']:.1f}.",
            ]
        if diff is not None:
            lines += [
                "",
                f"Merged export (from_pretrained) vs unmerged model: max |logit difference| {diff:.2e}.",
                "",
            ]
    emit(lines, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["prune", "prune_width", "recover", "qad", "lora", "lora_merge"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--hidden-loss", default="normalized_mse")
    ap.add_argument("--hidden-weight", type=float, default=1.0)
    ap.add_argument("--relations", action="store_true", help="recover: also hidden + relations + logit")
    ap.add_argument("--float-reference", action="store_true", help="qad: also the float KD student")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--tag", default="", help="qad: run more seeds into their own folder and part file")
    ap.add_argument("--report", type=Path, nargs="?", const=Path("-"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part:
        runner = {
            "prune": part_prune,
            "prune_width": part_prune_width,
            "recover": part_recover,
            "qad": part_qad,
            "lora": part_lora,
            "lora_merge": part_lora_merge,
        }[args.part]
        result = runner(args)
        OUT.mkdir(parents=True, exist_ok=True)
        write_json_atomic(OUT / f"{args.part}{'-' + args.tag if args.tag else ''}.json", result)
    if args.report is not None or not args.part:
        report(None if args.report in (None, Path("-")) else args.report)


if __name__ == "__main__":
    main()
