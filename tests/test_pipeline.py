"""End to end on a tiny random teacher: generation, both methods, before/after eval, report, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from distill.pipeline import run_recipe
from distill.recipe import parse_recipe
from tests.conftest import kill_after_first_checkpoint, tiny_recipe


def test_run_writes_everything(tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path) -> None:
    recipe = parse_recipe(tiny_recipe(tiny_teacher_dir, prompts_file, tmp_path / "run"))
    summary = run_recipe(recipe)
    run = tmp_path / "run"
    for f in (
        "recipe.yaml",
        "eval.json",
        "report.md",
        "report.html",
        "loss_curves.png",
        "kl_by_position.png",
    ):
        assert (run / f).is_file(), f
    generated = sorted((tmp_path / "generated").glob("*.jsonl"))
    assert [p.name.split("-")[0] for p in generated] == ["eval", "train"]
    for name in ("logit_kd", "seq_kd"):
        mdir = run / "methods" / name
        assert (mdir / "student" / "model.safetensors").is_file()
        rows = [json.loads(x) for x in (mdir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        after = summary["methods"][name]["after"]
        assert after["tokens"] > 0 and after["kl"] >= 0 and 0 <= after["top1_agreement"] <= 1
    assert summary["before"]["tokens"] == summary["methods"]["logit_kd"]["after"]["tokens"]
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["steps"] == 4
    # generated answers are stored once: a second run reuses them
    mtimes = [p.stat().st_mtime for p in generated]
    run_recipe(recipe)
    assert [p.stat().st_mtime for p in generated] == mtimes


def _write_recipe(tmp_path: Path, teacher: Path, train: Path, out: Path) -> Path:
    rec = tiny_recipe(teacher, train, out)
    rec["data"].pop("generate")
    rec["baselines"] = []
    rec["method"] = {"name": "logit_kd", "divergence": "jsd", "ce_weight": 0.1}
    rec["train"].update({"steps": 40, "checkpoint_every": 5, "warmup_steps": 3})
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "distill.cli", *args]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(
            json.dumps({"prompt": f"Say {i} twice.", "completion": f"{i} {i}, and again {i}."}) + "\n"
            for i in range(40)
        )
    )
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    straight = _write_recipe(tmp_path, tiny_teacher_dir, train, tmp_path / "straight")
    subprocess.run(_cli("run", str(straight)), check=True, env=env, capture_output=True)

    killed = _write_recipe(tmp_path, tiny_teacher_dir, train, tmp_path / "killed")
    kill_after_first_checkpoint(
        _cli("run", str(killed)), tmp_path / "killed" / "methods" / "logit_kd" / "checkpoints", env=env
    )
    assert not (tmp_path / "killed" / "methods" / "logit_kd" / "student").exists(), (
        "run finished before the kill"
    )

    subprocess.run(_cli("run", str(killed), "--resume"), check=True, env=env, capture_output=True)
    summary = json.loads((tmp_path / "killed" / "eval.json").read_text())
    resumed_from = summary["methods"]["logit_kd"]["resumed_from"]
    assert resumed_from is not None and 5 <= resumed_from < 40
    a = load_file(tmp_path / "straight" / "methods" / "logit_kd" / "student" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "methods" / "logit_kd" / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows_a = (tmp_path / "straight" / "methods" / "logit_kd" / "metrics.jsonl").read_text().splitlines()
    rows_b = (tmp_path / "killed" / "methods" / "logit_kd" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["loss"] for r in rows_a] == [json.loads(r)["loss"] for r in rows_b]


def test_seeds_and_labelled_variants_give_mean_and_interval(
    tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path
) -> None:
    rec = tiny_recipe(tiny_teacher_dir, prompts_file, tmp_path / "run")
    rec["method"] = {"name": "logit_kd", "label": "fwd_kl"}
    rec["baselines"] = [{"name": "logit_kd", "label": "jsd", "divergence": "jsd"}]
    rec["seeds"] = [0, 1, 2]
    rec["train"]["steps"] = 2
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(rec))
    done = subprocess.run(_cli("run", str(path)), capture_output=True, text=True, check=True)
    assert "95 % t interval over seeds [0, 1, 2]" in done.stdout and "±" in done.stdout, done.stdout
    summary = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert list(summary["methods"]) == ["fwd_kl", "jsd"]
    for label in ("fwd_kl", "jsd"):
        entry = summary["methods"][label]
        assert sorted(entry["seeds"]) == ["0", "1", "2"]
        lo, hi = entry["after_interval"]["kl"]
        kls = [entry["seeds"][s]["after"]["kl"] for s in ("0", "1", "2")]
        assert lo <= sum(kls) / 3 <= hi and lo < hi
        for s in (0, 1, 2):
            assert (
                tmp_path / "run" / "methods" / label / f"seed-{s}" / "student" / "model.safetensors"
            ).is_file()
    assert summary["methods"]["jsd"]["seeds"]["0"]["method"]["divergence"] == "jsd"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "mean over 3 seeds" in report or "over 3 seeds" in report


def test_same_method_twice_needs_labels(tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path) -> None:
    rec = tiny_recipe(tiny_teacher_dir, prompts_file, tmp_path / "run")
    rec["baselines"] = [{"name": "logit_kd", "divergence": "jsd"}]
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(rec))
    done = subprocess.run(_cli("validate", str(path)), capture_output=True, text=True)
    assert (
        done.returncode == 2
        and "distinct labels" in done.stderr
        and len(done.stderr.strip().splitlines()) == 1
    )
