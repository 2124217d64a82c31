"""Hinton KD on sklearn digits: torchdistill's KD criterion vs distill's pipeline, side by side.

One teacher (distill's SmallCNN, `cnn` width 32) is trained once on the standardized digits training split
and exported (model.safetensors + config.json). The same student (`mlp`, hidden [128], built after
`torch.manual_seed(seed)` exactly as distill's classifier family builds it) is then distilled with
loss = CE + T^2 KL(teacher_T || student_T), T = 4, Adam lr 3e-3 (constant), batch 64, the same number of
epochs and optimizer updates, by:

  (a) torchdistill 1.1.5: its registered criterion machinery (`get_high_level_loss` building a
      `WeightedSumLoss` whose one sub-term is the mid-level `KDLoss` with alpha = beta = 1), fed the same
      io_dict layout its distillation box builds (`{"student"|"teacher": {".": {"output": logits}}}`), inside
      a plain PyTorch loop, twice from the same init: batches from a shuffling `DataLoader(drop_last=True)`
      and from tensor indexing (as distill's stream does). torchdistill's training box (`torchdistill.core`)
      cannot be used here: importing it imports torchvision, and no torchvision wheel on PyPI loads
      against the CPU build of torch 2.13.0 (see docs/benchmarks/classifier_torchdistill.md);
  (b) distill: `parse_recipe` on a digits-kd style recipe (teacher.path = the exported teacher, kd only,
      label_fraction 1.0, no validation split, constant schedule, no weight decay, no clipping) and
      `run_recipe`.

distill's stream drops the last partial batch of each epoch, so both sides run floor(n_train / 64)
updates per epoch. Each repetition runs both halves (order alternating); the table gives the median and
(min-max) over repetitions of test accuracy and of training-loop wall and process-CPU seconds per epoch
(teacher forward included, data preparation and evaluation excluded).

torchdistill needs its own venv; this script runs in the project venv and starts the torchdistill half
there (default `.venv-torchdistill`, git-ignored):

    python3 -m venv .venv-torchdistill
    .venv-torchdistill/bin/pip install torch==2.13.0
    .venv-torchdistill/bin/pip install --no-deps torchvision==0.28.0
    .venv-torchdistill/bin/pip install numpy pyyaml scipy cython pillow
    .venv-torchdistill/bin/pip install --no-deps torchdistill==1.1.5

    .venv/bin/python benchmarks/classifier_torchdistill.py            # --epochs 20 --reps 3 --threads 1
    .venv/bin/python benchmarks/classifier_torchdistill.py --td-python /path/to/venv/bin/python

The worker half is this same file with `--worker BUNDLE` (PYTHONPATH=src, only torch and torchdistill
imported). Timing on a shared 2-core machine is noisy; use --threads 1 there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TD_PYTHON = REPO / ".venv-torchdistill" / "bin" / "python"
TEMPERATURE = 4.0
BATCH = 64
LR = 3e-3
IN_SHAPE = [1, 8, 8]
CLASSES = 10
STUDENT = ("mlp", {"hidden": [128]})
ROWS = {
    "torchdistill-dataloader": "torchdistill KDLoss, plain loop, DataLoader batches",
    "torchdistill-indexed": "torchdistill KDLoss, plain loop, tensor-indexed batches",
    "distill": "distill `run_recipe` (kd)",
}
TEACHER = ("cnn", {"width": 32})


def build_student(seed: int) -> torch.nn.Module:
    """The student as distill's classifier family builds it for a seed (same init on both sides)."""
    from distill.classifier.models import build_model

    torch.manual_seed(seed)
    return build_model(STUDENT[0], IN_SHAPE, CLASSES, STUDENT[1])


def test_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


# ------------------------------------------------------------------ torchdistill half (its own venv)


def torchdistill_criterion() -> torch.nn.Module:
    """CE + T^2 KL through torchdistill's registries, as its yaml `criterion` section would build it."""
    from torchdistill.common.constant import SELF_MODULE_PATH
    from torchdistill.losses.registry import get_high_level_loss

    kd = {
        "key": "KDLoss",
        "kwargs": {
            "student_module_path": SELF_MODULE_PATH,
            "student_module_io": "output",
            "teacher_module_path": SELF_MODULE_PATH,
            "teacher_module_io": "output",
            "temperature": TEMPERATURE,
            "alpha": 1.0,
            "beta": 1.0,
            "reduction": "batchmean",
        },
    }
    config = {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": kd, "weight": 1.0}}}}
    return get_high_level_loss(config)


def _indexed_batches(n: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Row ids of one epoch's full batches (a fresh permutation per epoch; the last partial batch dropped)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return [order[i : i + BATCH] for i in range(0, n - BATCH + 1, BATCH)]


def worker(bundle_path: Path, epochs: int, seed: int, threads: int) -> dict[str, Any]:
    """Train the student twice from the same init with torchdistill's criterion: batches from a shuffling
    DataLoader (what torchdistill's training box builds from a dataset) and from tensor indexing (what
    distill's stream does), so the loader's cost and the loss's cost can be told apart."""
    import copy

    import torchdistill
    from torch.utils.data import DataLoader, TensorDataset
    from torchdistill.common.constant import SELF_MODULE_PATH

    from distill.classifier.models import model_from_config
    from distill.losses.classifier_logits import kd_loss

    torch.set_num_threads(threads)
    bundle = torch.load(bundle_path, weights_only=True)
    teacher = model_from_config(json.loads(bundle["teacher_config"]))
    teacher.load_state_dict(bundle["teacher_state"])
    teacher.eval()
    init = build_student(seed)
    criterion = torchdistill_criterion()
    x_tr, y_tr = bundle["x_train"], bundle["y_train"]

    def io_dict(s_logits: torch.Tensor, t_logits: torch.Tensor) -> dict[str, Any]:
        return {
            "student": {SELF_MODULE_PATH: {"output": s_logits}},
            "teacher": {SELF_MODULE_PATH: {"output": t_logits}},
        }

    with torch.no_grad():  # sanity: the two losses agree on one batch of the untrained student
        s, t = init(x_tr[:BATCH]), teacher(x_tr[:BATCH])
        ours = kd_loss(s, t, TEMPERATURE).mean() + F.cross_entropy(s, y_tr[:BATCH])
        loss_gap = abs(float(criterion(io_dict(s, t), {}, y_tr[:BATCH])) - float(ours))

    def step(student: torch.nn.Module, optimizer: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor):
        with torch.no_grad():
            t_logits = teacher(xb)
        loss = criterion(io_dict(student(xb), t_logits), {}, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    warm = copy.deepcopy(init)  # a few untimed steps, so the first timed epoch is not a cold start
    warm_opt = torch.optim.Adam(warm.parameters(), lr=LR)
    for _ in range(5):
        step(warm, warm_opt, x_tr[:BATCH], y_tr[:BATCH])

    loader = DataLoader(
        TensorDataset(x_tr, y_tr),
        batch_size=BATCH,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    runs: dict[str, Any] = {}
    for kind in ("dataloader", "indexed"):
        student = copy.deepcopy(init)
        optimizer = torch.optim.Adam(student.parameters(), lr=LR)
        epoch_seconds, steps, c0 = [], 0, time.process_time()
        for epoch in range(epochs):
            student.train()
            t0 = time.perf_counter()
            if kind == "dataloader":
                for xb, yb in loader:
                    step(student, optimizer, xb, yb)
                    steps += 1
            else:
                for idx in _indexed_batches(len(y_tr), seed, epoch):
                    step(student, optimizer, x_tr[idx], y_tr[idx])
                    steps += 1
            epoch_seconds.append(time.perf_counter() - t0)
        cpu_seconds = time.process_time() - c0
        runs[kind] = {
            "accuracy": test_accuracy(student, bundle["x_test"], bundle["y_test"]),
            "epoch_seconds": epoch_seconds,
            "train_seconds": sum(epoch_seconds),
            "cpu_seconds": cpu_seconds,
            "steps": steps,
        }
    return {
        "torchdistill": torchdistill.__version__,
        "torch": torch.__version__,
        "criterion": " ".join(str(criterion).split()),
        "loss_gap_vs_distill": loss_gap,
        "runs": runs,
    }


# ------------------------------------------------------------------ distill half (project venv)


def train_teacher(data: dict[str, torch.Tensor], folder: Path, epochs: int, threads: int) -> float:
    """A plain cross-entropy loop; exported the way distill's classifier family exports a model."""
    from safetensors.torch import save_file

    from distill.classifier.models import build_model, model_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(TEACHER[0], IN_SHAPE, CLASSES, TEACHER[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(0)
    x, y = data["x_train"], data["y_train"]
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(order) - BATCH + 1, BATCH):
            idx = order[i : i + BATCH]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model_config(model)), encoding="utf-8")
    return test_accuracy(model, data["x_test"], data["y_test"])


class _TrainingCpuClock:
    """A distill Progress that reads process CPU time at the engine's start and finish of training (the
    same span as its `train_seconds`): with one thread, far less sensitive to other processes than wall."""

    def __init__(self) -> None:
        self.seconds, self._t0 = 0.0, None

    def start(self, label: str, total: int | None) -> None:
        self._t0 = time.process_time() if label.startswith("training") else None

    def advance(self, n: int = 1, info: str = "") -> None:
        pass

    def finish(self) -> None:
        if self._t0 is not None:
            self.seconds += time.process_time() - self._t0
            self._t0 = None

    def log(self, message: str) -> None:
        pass


def run_distill(teacher_dir: Path, out_dir: Path, epochs: int, steps_per_epoch: int, seed: int,
                threads: int) -> dict[str, Any]:  # fmt: skip
    from distill.pipeline import run_recipe
    from distill.recipe import parse_recipe

    recipe = parse_recipe(
        {
            "name": "digits-kd-vs-torchdistill",
            "seed": seed,
            "output_dir": str(out_dir),
            "data": {
                "kind": "digits",
                "label_fraction": 1.0,
                "validation_fraction": 0.0,
                "batch_size": BATCH,
            },
            "teacher": {"model": {"arch": TEACHER[0], "options": TEACHER[1]}, "path": str(teacher_dir)},
            "student": {"arch": STUDENT[0], "options": STUDENT[1]},
            "method": {"name": "kd", "temperature": TEMPERATURE, "ce_weight": 1.0, "kd_weight": 1.0},
            "train": {
                "steps": epochs * steps_per_epoch,
                "lr": LR,
                "weight_decay": 0.0,
                "schedule": "constant",
                "max_grad_norm": None,
                "threads": threads,
            },
            "eval": {"every": 0, "before": False},
        }
    )
    clock = _TrainingCpuClock()
    summary = run_recipe(recipe, progress=clock)
    entry = summary["methods"][summary["primary"]]
    return {
        "accuracy": entry["after"]["accuracy"],
        "train_seconds": entry["train_seconds"],
        "cpu_seconds": clock.seconds,
        "steps": entry["steps"],
        "teacher_accuracy": summary["references"]["teacher"]["accuracy"],
    }


def run_torchdistill(td_python: Path, bundle: Path, epochs: int, seed: int, threads: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [str(td_python), str(Path(__file__).resolve()), "--worker", str(bundle), "--epochs", str(epochs),
           "--seed", str(seed), "--threads", str(threads)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"torchdistill worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _fmt(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    v = [x * scale for x in values]
    return f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="student init and data order seed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--td-python", type=Path, default=DEFAULT_TD_PYTHON, help="python of the torchdistill venv"
    )
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.epochs, args.seed, args.threads)))
        return 0
    if not args.td_python.exists():
        raise SystemExit(f"no torchdistill venv at {args.td_python} (see this file's docstring)")

    from distill.classifier.data import load_digits_data, standardize

    d = load_digits_data()
    x_tr, x_te = standardize(d.x_train, d.x_test)
    data = {"x_train": x_tr, "y_train": d.y_train, "x_test": x_te, "y_test": d.y_test}
    steps_per_epoch = len(d.y_train) // BATCH
    with tempfile.TemporaryDirectory(prefix="kd-vs-torchdistill-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        teacher_acc = train_teacher(data, work / "teacher", args.teacher_epochs, args.threads)
        print(
            f"teacher cnn(width 32): test accuracy {teacher_acc:.4f}, "
            f"trained in {time.perf_counter() - t0:.1f} s"
        )
        from safetensors.torch import load_file

        bundle = work / "bundle.pt"
        config = (work / "teacher" / "config.json").read_text(encoding="utf-8")
        state = load_file(str(work / "teacher" / "model.safetensors"))
        torch.save({**data, "teacher_state": state, "teacher_config": config}, bundle)
        print(f"train rows {len(d.y_train)}, test rows {len(d.y_test)}, {steps_per_epoch} updates/epoch, "
              f"{args.epochs} epochs, threads {args.threads}")  # fmt: skip

        runs: dict[str, list[dict[str, Any]]] = {key: [] for key in ROWS}
        info: dict[str, Any] = {}
        for rep in range(args.reps):
            order = ["torchdistill", "distill"] if rep % 2 == 0 else ["distill", "torchdistill"]
            for side in order:
                if side == "torchdistill":
                    out = run_torchdistill(args.td_python, bundle, args.epochs, args.seed, args.threads)
                    info = {k: v for k, v in out.items() if k != "runs"}
                    got = {f"torchdistill-{kind}": r for kind, r in out["runs"].items()}
                else:
                    got = {"distill": run_distill(work / "teacher", work / f"distill-{rep}", args.epochs,
                                                  steps_per_epoch, args.seed, args.threads)}  # fmt: skip
                for key, r in got.items():
                    runs[key].append(r)
                    print(
                        f"rep {rep} {key:22s}: accuracy {r['accuracy']:.4f}, "
                        f"{r['train_seconds'] / args.epochs:.3f} s/epoch wall, "
                        f"{r['cpu_seconds'] / args.epochs:.3f} s/epoch CPU, {r['steps']} updates"
                    )

    print(f"\ntorchdistill {info['torchdistill']} on torch {info['torch']}; criterion: {info['criterion']}")
    print(f"|loss(torchdistill) - loss(distill)| on one batch: {info['loss_gap_vs_distill']:.2e}")
    print(f"teacher test accuracy as distill loaded it: {runs['distill'][0]['teacher_accuracy']:.4f}")
    print(f"\n{args.reps} repetitions, {args.epochs} epochs, threads {args.threads}; median (min-max)")
    print("| run | test accuracy % | train-loop wall s/epoch | train-loop CPU s/epoch | updates |")
    print("| --- | --- | --- | --- | --- |")
    med, med_cpu = {}, {}
    for key, label in ROWS.items():
        acc = [r["accuracy"] for r in runs[key]]
        spe = [r["train_seconds"] / args.epochs for r in runs[key]]
        cpu = [r["cpu_seconds"] / args.epochs for r in runs[key]]
        med_cpu[key] = statistics.median(cpu)
        med[key] = statistics.median(spe)
        print(f"| {label} | {_fmt(acc, 100, 2)} | {_fmt(spe)} | {_fmt(cpu)} | {runs[key][0]['steps']} |")
    for key in ("torchdistill-dataloader", "torchdistill-indexed"):
        print(
            f"distill / {key}, median s/epoch: wall {med['distill'] / med[key]:.2f}, "
            f"CPU {med_cpu['distill'] / med_cpu[key]:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
