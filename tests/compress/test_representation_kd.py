"""representation_kd end to end on the tiny teacher: the taps read the right blocks (a student that IS
the teacher has zero hidden and relation losses), projections train and stay out of the export, and
bad layer maps are one-line errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.configs.compress import RepresentationKDConfig
from distill.data.batching import BatchStream
from distill.errors import RecipeError
from distill.families.lm import LMFamily
from distill.methods.base import Phase, StepContext
from distill.methods.lm.base import LMContext
from distill.methods.lm.representation_kd import RepresentationKD
from distill.pipeline import run_recipe
from distill.progress import NullProgress
from distill.recipe import parse_recipe
from distill.teachers.live import LiveTeacherSource
from tests.cli.test_errors import assert_one_line_error, run_cli, write
from tests.conftest import tiny_llama, tiny_recipe

TERMS = {
    "hidden": {"layers": "all", "loss": "mse"},
    "relations": {"kinds": ["attention", "query", "key", "value"], "layers": "all", "heads": 2},
}


def _batch(teacher_dir: Path, prompts: Path, tmp: Path) -> tuple[LMFamily, object]:
    from accelerate import Accelerator

    recipe = parse_recipe(tiny_recipe(teacher_dir, prompts, tmp / "run"))
    fam = LMFamily()
    fam.prepare(recipe, Accelerator(cpu=True), NullProgress())
    stream = fam.make_stream(fam.make_method(recipe.method, 0), 0)
    assert isinstance(stream, BatchStream)
    return fam, stream.next_batch()


def _method(
    fam: LMFamily,
    student: torch.nn.Module,
    cfg: dict,
    origin: list[int] | None = None,
    kept: list[int] | None = None,
) -> RepresentationKD:
    ctx = LMContext(
        student=student,
        teacher=fam.source,
        vocab_size=fam.prep.vocab,
        chunk_size=64,
        tokenizer=fam.prep.tokenizer,
        layer_origin=origin,
        kept_channels=kept,
    )
    return RepresentationKD(RepresentationKDConfig.model_validate({"name": "representation_kd", **cfg}), ctx)


def _loss(method: RepresentationKD, batch: object) -> tuple[torch.Tensor, dict[str, float]]:
    step = StepContext(
        modules=method.modules(),
        normalizer=float(batch.num_loss_tokens),
        phase=Phase(),
        step=0,  # type: ignore[attr-defined]
        device=torch.device("cpu"),
    )
    return method.loss(step, batch)  # type: ignore[arg-type]


def test_teacher_copy_has_zero_representation_losses(
    tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path
) -> None:
    fam, batch = _batch(tiny_teacher_dir, prompts_file, tmp_path)
    assert isinstance(fam.source, LiveTeacherSource)
    student = copy.deepcopy(fam.source.model).train()
    method = _method(fam, student, TERMS)
    loss, parts = _loss(method, batch)
    assert parts["hidden"] == pytest.approx(0.0, abs=1e-10) and parts["relations"] == pytest.approx(
        0.0, abs=1e-8
    )
    assert parts["kd"] == pytest.approx(0.0, abs=1e-6)
    # a mismatched map (student block 0 against teacher block 3) is not zero: the pairs are really used
    _, parts = _loss(_method(fam, student, {"hidden": {"layers": [[0, 3]], "loss": "mse"}}), batch)
    assert parts["hidden"] > 1e-4


def test_pruned_student_pairs_with_its_origin_and_projects(
    tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path
) -> None:
    fam, batch = _batch(tiny_teacher_dir, prompts_file, tmp_path)
    narrow = tiny_llama(layers=2, hidden=16, seed=1)  # width 16 against the teacher's 32: projections
    method = _method(fam, narrow, TERMS, origin=[0, 3])
    assert method.hidden_pairs == [(0, 0), (1, 3)] and method.relation_pairs == [(0, 0), (1, 3)]
    assert set(method.modules()) == {"student", "projector"}
    loss, parts = _loss(method, batch)
    loss.backward()
    proj = method.projector.maps["0"].weight
    assert proj.grad is not None and proj.grad.abs().sum() > 0
    assert parts["hidden"] > 0 and parts["relations"] > 0
    # without origin, student block i pairs with the teacher block at the same relative depth
    assert _method(fam, narrow, TERMS).hidden_pairs == [(0, 1), (1, 3)]
    # a width-pruned student's projection starts as the inverse of the pruning: channel i -> kept[i]
    kept = list(range(0, 32, 2))
    w = _method(fam, narrow, TERMS, kept=kept).projector.maps["1"].weight
    assert torch.equal(w[kept], torch.eye(16)) and w.abs().sum() == 16


def test_bad_layer_maps_name_the_field(tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path) -> None:
    fam, _ = _batch(tiny_teacher_dir, prompts_file, tmp_path)
    student = tiny_llama(layers=2, seed=1)
    with pytest.raises(RecipeError, match=r"^method.hidden.layers: student layer 5 does not exist"):
        _method(fam, student, {"hidden": {"layers": [[5, 0]]}})
    with pytest.raises(RecipeError, match=r"^method.relations.layers: teacher layer 9 does not exist"):
        _method(fam, student, {"relations": {"layers": [[0, 9]]}})
    with pytest.raises(RecipeError, match=r"^method.relations.heads: 3 relation heads"):
        _method(fam, student, {"relations": {"heads": 3}})


def test_run_exports_a_plain_student(tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path) -> None:
    method = {"name": "representation_kd", **TERMS}
    rec = tiny_recipe(tiny_teacher_dir, prompts_file, tmp_path / "run", method=method, baselines=[])
    rec["student"] = {"init": "prune", "prune": {"keep_layers": 2, "width": {"hidden_size": 24}}}
    summary = run_recipe(parse_recipe(rec))
    folder = tmp_path / "run" / "methods" / "representation_kd"
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert all("hidden" in r and "relations" in r for r in rows)
    student = AutoModelForCausalLM.from_pretrained(folder / "student")
    assert student.config.hidden_size == 24 and not any("maps" in k for k in student.state_dict())
    assert summary["methods"]["representation_kd"]["after"]["kl"] >= 0


def test_cli_refuses_a_cached_teacher_and_a_missing_layer(
    tmp_path: Path, tiny_teacher_dir: Path, prompts_file: Path
) -> None:
    rec = tiny_recipe(tiny_teacher_dir, prompts_file, tmp_path / "run", baselines=[])
    rec["method"] = {"name": "representation_kd", "hidden": {"layers": [[0, 0]]}}
    rec["teacher"] = {"kind": "cache", "path": str(tmp_path / "cache")}
    rec["student"] = {"init": "config", "config": {"num_hidden_layers": 2}}
    assert_one_line_error(run_cli("validate", str(write(tmp_path, rec))), "method", "hidden_states", "cache")
    rec = tiny_recipe(tiny_teacher_dir, prompts_file, tmp_path / "run", baselines=[])
    rec["method"] = {"name": "representation_kd", "hidden": {"layers": [[7, 0]]}}
    assert_one_line_error(
        run_cli("run", str(write(tmp_path, rec))), "method.hidden.layers", "student layer 7"
    )
