"""The dataset-distillation family: condense the real training rows into `ipc` examples per class, then
judge the set the trustworthy way: fresh randomly initialised networks trained on it alone, several
seeds and architectures, the test split scored once per network; beside every method the controls a
reader needs (the full data, a random subset with hard labels and, with a teacher, with soft labels) and
DD-Ranking's HLR and IOR."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from distill.classifier.models import build_model
from distill.classifier.prepare import Rows, table_rows
from distill.classifier.teachers import make_teacher
from distill.condense.dd_ranking import dd_ranking_score, hard_label_recovery, improvement_over_random
from distill.condense.evaluate import evaluate_set
from distill.condense.selection import dataset_quantization, herding_selection, random_selection
from distill.configs.base import MethodConfigBase
from distill.configs.condense import CondenseMethodConfig, DatasetQuantizationConfig, HerdingConfig
from distill.errors import InputError, RecipeError
from distill.eval.report_grid import GRID_PLOT, plot_sets
from distill.families.base import FAMILIES, Family
from distill.methods import condense as _registers  # noqa: F401 - registers the condense methods
from distill.methods.base import METHODS, Method, Stream
from distill.methods.classifier.base import TeacherNet
from distill.methods.condense.base import ClassStream, CondenseContext, CondenseMethod, SelectionMethod
from distill.methods.condense.matching import embed
from distill.progress import Progress
from distill.recipe_base import RecipeBase
from distill.recipe_condense import CondenseRecipe


@FAMILIES.register("condense")
class CondenseFamily(Family):
    name = "condense"

    def prepare(self, recipe: RecipeBase, acc: Accelerator, progress: Progress) -> None:
        assert isinstance(recipe, CondenseRecipe)
        self.recipe, self.acc, self.progress = recipe, acc, progress
        t0 = time.perf_counter()
        try:
            self.rows: Rows = table_rows(recipe.data)
        except ValueError as err:
            raise InputError(f"data: {err}") from None
        rows = self.rows
        self.x, self.y = rows.x[rows.train], rows.y[rows.train]
        ipc = recipe.synthetic.ipc
        for c in range(rows.classes):
            n = int((self.y == c).sum())
            if ipc > n:
                raise InputError(
                    f"synthetic.ipc: {ipc} exceeds the {n} training rows of class {rows.class_names[c]}"
                )
        for i, spec in enumerate(recipe.eval.archs):
            try:
                build_model(spec.arch, rows.in_shape, rows.classes, spec.options)
            except ValueError as err:
                raise RecipeError(f"eval.archs.{i}: {err}") from None
        self.network(0)
        self.timing = {"load_s": time.perf_counter() - t0}
        t0 = time.perf_counter()
        self.teacher: TeacherNet | None = None
        if recipe.teacher is not None:
            self.teacher, _ = make_teacher(recipe, rows, acc, progress)
        self.timing["teacher_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.references = self._references()
        self.timing["references_s"] = time.perf_counter() - t0

    def network(self, seed: int) -> torch.nn.Module:
        """The matching network, freshly initialised from `seed` (the global RNG, which the engine
        checkpoints and methods draw from, is left as it was)."""
        spec = self.recipe.network
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                return build_model(spec.arch, self.rows.in_shape, self.rows.classes, spec.options)
            except ValueError as err:
                raise RecipeError(f"network: {err}") from None

    # ------------------------------------------------------------------ evaluation protocol

    def _soft(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        with torch.no_grad():
            return self.teacher(x, torch.zeros(len(x), dtype=torch.long)).softmax(-1).mean(0)

    def _score(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        soft: torch.Tensor | None,
        arch_index: int = 0,
        epochs: int | None = None,
    ) -> dict[str, Any]:
        e, rows = self.recipe.eval, self.rows
        spec = e.archs[arch_index]
        return evaluate_set(
            spec.arch, spec.options, rows.in_shape, rows.classes, x, y, soft=soft,
            x_test=rows.x[rows.test], y_test=rows.y[rows.test], seeds=list(range(e.seeds)), epochs=epochs or e.epochs,
            lr=e.lr, batch_size=e.batch_size,
        )  # fmt: skip

    def _references(self) -> dict[str, dict[str, Any]]:
        """The controls every method is read against, on the first evaluation architecture."""
        ipc, refs = self.recipe.synthetic.ipc, {}
        self.progress.log("evaluating the controls: full data, random subset")
        full = self._score(self.x, self.y, None, epochs=self.recipe.eval.full_epochs)
        refs["full data (hard labels)"] = {"accuracy": full["mean"]}
        chosen = random_selection(self.y, ipc, self.recipe.seed)
        rand = self._score(self.x[chosen], self.y[chosen], None)
        refs[f"random {ipc}/class (hard labels)"] = {"accuracy": rand["mean"]}
        self.full_hard, self.random_hard, self.random_soft = full["mean"], rand["mean"], None
        soft = self._soft(self.x[chosen]) if self.recipe.eval.soft_labels else None
        if soft is not None:
            rand_soft = self._score(self.x[chosen], self.y[chosen], soft)
            refs[f"random {ipc}/class (teacher soft labels)"] = {
                "accuracy": rand_soft["mean"],
                "soft_accuracy": rand_soft["mean"],
            }
            self.random_soft = rand_soft["mean"]
        return refs

    # ------------------------------------------------------------------ methods

    def _context(self, seed: int, init: str = "real") -> CondenseContext:
        s, rows, ipc = self.recipe.synthetic, self.rows, self.recipe.synthetic.ipc
        chosen = random_selection(self.y, ipc, seed)
        labels = torch.arange(rows.classes).repeat_interleave(ipc)
        if init == "real":
            images = self.x[chosen].clone()
        else:
            images = torch.randn(
                (rows.classes * ipc, *rows.in_shape), generator=torch.Generator().manual_seed(seed)
            )
        lr = self.recipe.train.lr
        return CondenseContext(
            classes=rows.classes, ipc=ipc, in_shape=rows.in_shape, init_images=images, labels=labels,
            make_network=self.network, image_lr_scale=s.image_lr / lr, label_lr_scale=s.label_lr / lr,
            lr_lr_scale=s.lr_lr / lr, teacher=self.teacher,
        )  # fmt: skip

    def make_method(self, cfg: MethodConfigBase, seed: int) -> Method:
        assert isinstance(cfg, CondenseMethodConfig)
        ctx = self._context(seed, getattr(cfg, "init", "real"))
        if not cfg.learned:
            return SelectionMethod(ctx, cfg, self.x, self._select(cfg, seed), self.y)
        method = METHODS.get(cfg.name)(ctx, cfg)  # type: ignore[call-arg]
        if hasattr(method, "attach"):
            method.attach(self, seed)  # methods that need the family's data (MTT's experts)
        return method

    def _select(self, cfg: CondenseMethodConfig, seed: int) -> torch.Tensor:
        ipc = self.recipe.synthetic.ipc
        if isinstance(cfg, HerdingConfig | DatasetQuantizationConfig):
            emb = self._embeddings()
            if isinstance(cfg, HerdingConfig):
                return herding_selection(emb, self.y, ipc)
            return dataset_quantization(emb, self.y, ipc, cfg.bins, seed)
        return random_selection(self.y, ipc, seed)

    def _embeddings(self) -> torch.Tensor:
        """Penultimate features of the teacher where there is one, else of a randomly initialised
        matching network (the embedding distribution matching also uses)."""
        model = self.teacher.live if self.teacher is not None else self.network(self.recipe.seed)
        model.eval()
        with torch.no_grad():
            return embed(model, self.x)

    def make_stream(self, method: Method, seed: int) -> Stream:
        per_class = getattr(getattr(method, "cfg", None), "real_batch", 1)
        return ClassStream(self.x, self.y, self.rows.classes, per_class, seed)

    def evaluate(self, method: Method | None, progress: Progress) -> dict[str, Any] | None:
        if not isinstance(method, CondenseMethod):
            return None
        return self.score_set(method.synthetic())

    def score_set(self, data: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The protocol's numbers for a set {images, labels[, soft_labels, lr]} (a run's or a saved one)."""
        x, y, learned_soft = data["images"], data["labels"], data.get("soft_labels")
        out: dict[str, Any] = {}
        for i, spec in enumerate(self.recipe.eval.archs):
            res = self._score(x, y, learned_soft, i)
            out["accuracy" if i == 0 else f"accuracy_{spec.arch}"] = res["mean"]
            if i == 0:
                out["accuracy_per_seed"] = res["acc"]
        out["hard_accuracy"] = out["accuracy"] if learned_soft is None else self._score(x, y, None)["mean"]
        out["hlr"] = hard_label_recovery(self.full_hard, out["hard_accuracy"])
        soft = self._soft(x) if self.recipe.eval.soft_labels else None
        if soft is not None and self.random_soft is not None:
            out["soft_accuracy"] = self._score(x, y, soft)["mean"]
            out["ior"] = improvement_over_random(out["soft_accuracy"], self.random_soft)
        else:
            out["ior"] = improvement_over_random(out["hard_accuracy"], self.random_hard)
        out["dd_score"] = dd_ranking_score(out["hlr"], out["ior"])
        if "lr" in data:
            out["learned_lr"] = float(data["lr"].reshape(-1)[0])
        return out

    def figures(self, run_dir: Path, summary: dict[str, Any]) -> dict[str, str]:
        """Each method's set (its first seed's), one row per class, beside real training images."""
        from safetensors.torch import load_file

        sets = {}
        for label in summary.get("methods", {}):
            folder = run_dir / "methods" / label
            files = sorted(folder.glob("**/student/synthetic.safetensors"))
            if files:
                data = load_file(str(files[0]))
                sets[label] = (data["images"], data["labels"])
        if plot_sets(sets, (self.x, self.y), self.rows.classes, run_dir / GRID_PLOT):
            return {
                GRID_PLOT: "Distilled sets, one row per class, beside real training images (first seed of each method)"
            }
        return {}

    def describe(self) -> dict[str, Any]:
        r = self.recipe
        return {
            "teacher": r.teacher.model.arch if r.teacher is not None else None,
            "student": {"arch": f"synthetic set, {r.synthetic.ipc} per class"},
            "data": {"condense": self.rows.describe()},
            "references": self.references,
        }

    def timings(self) -> dict[str, float]:
        return dict(self.timing)

    def result_columns(self) -> list[dict[str, str]]:
        first = self.recipe.eval.archs[0].arch
        cols = [
            {
                "key": "accuracy",
                "title": f"test acc. ({first}, trained on the set)",
                "format": "pct",
                "better": "higher",
            }
        ]
        cols += [
            {
                "key": f"accuracy_{a.arch}",
                "title": f"test acc. ({a.arch})",
                "format": "pct",
                "better": "higher",
            }
            for a in self.recipe.eval.archs[1:]
        ]
        if self.recipe.eval.soft_labels:
            cols.append(
                {
                    "key": "soft_accuracy",
                    "title": "test acc. (teacher soft labels)",
                    "format": "pct",
                    "better": "higher",
                }
            )
        cols.append({"key": "ior", "title": "IOR", "format": "pct", "better": "higher"})
        cols.append({"key": "hlr", "title": "HLR", "format": "pct", "better": "lower"})
        cols.append({"key": "dd_score", "title": "DD-Ranking score", "format": "num", "better": "higher"})
        return cols

    def results_note(self) -> str:
        e, d = self.recipe.eval, self.rows.describe()
        return (
            f"Each set trains {e.seeds} freshly initialised networks per architecture for {e.epochs} epochs; test accuracy "
            f"on {d['test_rows']} held-out rows, scored once per network. IOR: accuracy over a random subset of the same "
            "size under the same labels (soft labels when the teacher's are used); HLR: full-data accuracy minus the "
            "set's with hard labels (lower is better); DD-Ranking score = normalised exp(IOR/2 - HLR/2)."
        )


def evaluate_saved_set(
    recipe: CondenseRecipe, folder: Path, output: Path | None, progress: Progress
) -> tuple[dict[str, Any], Path]:
    """`distill eval` of a saved set (synthetic.safetensors from a run's export, or any file with
    `images` and `labels`) with the recipe's data, controls and protocol."""
    from accelerate import Accelerator
    from safetensors.torch import load_file

    from distill.io import write_json_atomic

    file = folder / "synthetic.safetensors" if folder.is_dir() else folder
    if not file.is_file():
        raise InputError(f"--student: no synthetic.safetensors in {folder}")
    data = load_file(str(file))
    for key in ("images", "labels"):
        if key not in data:
            raise InputError(f"{file}: no tensor {key!r}")
    recipe.preflight()
    family = CondenseFamily()
    family.prepare(recipe, Accelerator(cpu=True), progress)
    if list(data["images"].shape[1:]) != family.rows.in_shape:
        raise InputError(
            f"{file}: images are {list(data['images'].shape[1:])}, the recipe's data {family.rows.in_shape}"
        )
    result = {**family.score_set(data), "references": family.references}
    path = output or (folder if folder.is_dir() else folder.parent) / "eval.standalone.json"
    write_json_atomic(path, result)
    return {**result, "columns": family.result_columns()}, path
