"""`distill run` on 2 CPU processes (torchrun, gloo) as the README documents it: the ranks train on
disjoint shards of each global batch, the final weights equal a 1-process run with the same global batch
(float64, 1e-6), metrics / eval.json / report are written once; the same after a SIGKILL and --resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.data.batching import BatchStream
from distill.data.tokenize import TokenizedExample
from tests.conftest import kill_after_first_checkpoint

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def _recipe(
    tmp_path: Path, teacher: Path, train: Path, name: str, batch_size: int, **train_extra: object
) -> Path:
    rec = {
        "name": name,
        "output_dir": str(tmp_path / name),
        "teacher": {"kind": "live", "model": {"path": str(teacher), "dtype": "float64"}},
        "student": {"init": "prune", "prune": {"keep_layers": 2}},
        "data": {
            "train": {"path": str(train)},
            "eval": {"path": str(train), "limit": 4},
            "max_length": 64,
            "batch_size": batch_size,
        },
        "method": {"name": "logit_kd", "divergence": "jsd", "ce_weight": 0.2},
        "train": {"steps": STEPS, "lr": 1e-3, "warmup_steps": 2, "threads": 1, **train_extra},
        "eval": {"batch_size": 4},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path


def _torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "distill.cli",
        *args,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "methods" / "logit_kd" / "student" / "model.safetensors")


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.float64
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "train.jsonl"
    rows = [
        {"prompt": f"Count to {i}.", "completion": " ".join(str(j) for j in range(i % 7 + 2))}
        for i in range(26)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_shards_are_disjoint_and_cover_every_example_once_per_epoch() -> None:
    examples = [TokenizedExample(list(range(3 + i % 5)), prompt_len=1) for i in range(26)]
    streams = []
    for rank in range(2):
        s = BatchStream(examples, 2, 0, seed=3, group_by_length=True, packing=False, max_length=64)
        s.shard(rank, 2)
        streams.append(s)
    single = BatchStream(examples, 4, 0, seed=3, group_by_length=True, packing=False, max_length=64)
    seen: list[list[int]] = [[], []]
    for _ in range(len(single._current_plan())):  # one epoch
        whole = single._current_plan()[single.index]
        single.next_batch()
        parts = []
        for rank, s in enumerate(streams):
            from distill.data.batching import shard_rows

            rows = shard_rows(s._current_plan()[s.index], rank, 2)
            s.next_batch()
            parts.append([i for r in rows for i in r])
            seen[rank] += parts[-1]
        assert not set(parts[0]) & set(parts[1]) and parts[0] and parts[1]
        assert sorted(parts[0] + parts[1]) == sorted(i for r in whole for i in r)
    assert sorted(seen[0] + seen[1]) == list(range(26))


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path: Path, tiny_teacher_dir: Path, data: Path) -> None:
    one = _recipe(tmp_path, tiny_teacher_dir, data, "one", batch_size=4)
    subprocess.run(
        [sys.executable, "-m", "distill.cli", "run", str(one)],
        check=True,
        env=_env(),
        capture_output=True,
        cwd=ROOT,
    )
    two = _recipe(tmp_path, tiny_teacher_dir, data, "two", batch_size=2)
    done = subprocess.run(_torchrun("run", str(two)), env=_env(), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("report:") == 1, done.stdout
    _assert_close(_weights(tmp_path / "two"), _weights(tmp_path / "one"))
    rows = (tmp_path / "two" / "methods" / "logit_kd" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(1, STEPS + 1))  # one writer
    one_rows = [
        json.loads(r)
        for r in (tmp_path / "one" / "methods" / "logit_kd" / "metrics.jsonl").read_text().splitlines()
    ]
    for a, b in zip(one_rows, (json.loads(r) for r in rows), strict=True):
        assert a["loss_units"] == b["loss_units"]  # global token count, not doubled
        assert abs(a["loss"] - b["loss"]) < 1e-9
        assert b["real_tokens"] < a["real_tokens"]  # rank 0 saw only its share
    summary = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert summary["methods"]["logit_kd"]["after"]["tokens"] > 0
    assert (tmp_path / "two" / "report.md").is_file()


@pytest.mark.slow
def test_two_processes_sigkill_then_resume(tmp_path: Path, tiny_teacher_dir: Path, data: Path) -> None:
    one = _recipe(tmp_path, tiny_teacher_dir, data, "one", batch_size=4)
    subprocess.run(
        [sys.executable, "-m", "distill.cli", "run", str(one)],
        check=True,
        env=_env(),
        capture_output=True,
        cwd=ROOT,
    )
    two = _recipe(tmp_path, tiny_teacher_dir, data, "two", batch_size=2, checkpoint_every=2)
    ckpts = tmp_path / "two" / "methods" / "logit_kd" / "checkpoints"
    kill_after_first_checkpoint(_torchrun("run", str(two)), ckpts, env=_env(), cwd=ROOT)
    assert not (tmp_path / "two" / "methods" / "logit_kd" / "student").exists(), "finished before the kill"
    done = subprocess.run(
        _torchrun("run", str(two), "--resume"), env=_env(), capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert 2 <= summary["methods"]["logit_kd"]["resumed_from"] < STEPS
    _assert_close(_weights(tmp_path / "two"), _weights(tmp_path / "one"))
