"""The classifier family: digits, tensor files, image folders and graphs; a teacher trained once by the
run (or loaded; or an ensemble); students from the model zoo; logit, feature and self-distillation
methods; test accuracy of the last and the best-on-validation student, per class, over seeds."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from accelerate import Accelerator

from distill.classifier.augment import Augment
from distill.classifier.batches import TensorStream
from distill.classifier.models import model_config
from distill.classifier.prepare import Rows, load_rows, stream_rows
from distill.classifier.teachers import build, make_teacher
from distill.configs.base import HIDDEN_STATES, MethodConfigBase
from distill.configs.classifier import BornAgainConfig, CEConfig, VQGraphConfig
from distill.engine.trainer import train
from distill.errors import RecipeError
from distill.families.base import FAMILIES, Family
from distill.methods import classifier as _registers  # noqa: F401 - registers the classifier methods
from distill.methods.base import METHODS, Method, Stream
from distill.methods.classifier.base import ClassifierContext, ClassifierMethod, TeacherNet
from distill.methods.classifier.logits import CrossEntropy
from distill.methods.classifier.self_distill import BornAgainRound
from distill.methods.classifier.vqgraph import VQGraph, code_log_probs
from distill.progress import Progress
from distill.recipe_base import RecipeBase
from distill.recipe_classifier import ClassifierRecipe


def predictions(
    model: torch.nn.Module | TeacherNet, x: torch.Tensor, index: torch.Tensor, batch: int = 512
) -> torch.Tensor:
    """Class predictions in eval mode; a teacher ensemble votes with its averaged probabilities."""
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    out = []
    with torch.no_grad():
        for i in range(0, len(index), batch):
            xb, ib = x[i : i + batch].to(device), index[i : i + batch].to(device)
            if isinstance(model, TeacherNet):
                out.append(model(xb, ib).softmax(-1).mean(0).argmax(-1).cpu())
            else:
                out.append(model(xb).argmax(-1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def scores(pred: torch.Tensor, y: torch.Tensor, classes: int, prefix: str = "") -> dict[str, Any]:
    """Accuracy, balanced per-class accuracy and the confusion matrix (rows: true class)."""
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    per_class = confusion.diag().double() / confusion.sum(1).clamp(min=1).double()
    return {
        f"{prefix}accuracy": float((pred == y).double().mean()) if len(y) else float("nan"),
        f"{prefix}balanced_accuracy": float(per_class.mean()),
        f"{prefix}per_class_accuracy": per_class.tolist(),
        f"{prefix}confusion": confusion.tolist(),
    }


@FAMILIES.register("classifier")
class ClassifierFamily(Family):
    name = "classifier"

    def prepare(self, recipe: RecipeBase, acc: Accelerator, progress: Progress) -> None:
        assert isinstance(recipe, ClassifierRecipe)
        self.recipe, self.acc, self.progress = recipe, acc, progress
        t0 = time.perf_counter()
        self.rows: Rows = load_rows(recipe)
        self.timing = {"load_s": time.perf_counter() - t0}
        a = recipe.data.augment
        self.augment = Augment(a.crop_padding, a.flip, a.mixup_alpha, a.cutmix_alpha)
        self._student(recipe.seed)  # a bad architecture or option fails now, not after the teacher trains
        self._dry_build()
        t0 = time.perf_counter()
        self.teacher: TeacherNet | None = None
        self.teacher_info: dict[str, Any] = {}
        self._code_cache: dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]] = {}
        if recipe.teacher is not None:
            self.teacher, self.teacher_info = make_teacher(recipe, self.rows, acc, progress)
        self.timing["teacher_s"] = time.perf_counter() - t0

    def _student(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        s = self.recipe.student
        return build(s.arch, self.rows.in_shape, self.rows.classes, s.options, "student")

    def _dry_build(self) -> None:
        """Build every method once on untrained models, so a wrong module path or a projector that cannot
        fit fails in a second, before the teacher trains."""
        t = self.recipe.teacher
        for field, cfg in zip(self.recipe.method_fields(), self.recipe.methods(), strict=True):
            if HIDDEN_STATES not in cfg.teacher_needs and cfg.name != "ofa":
                continue
            teacher = None
            if t is not None and self.rows.graph is None:
                teacher = TeacherNet(
                    [
                        build(
                            t.model.arch,
                            self.rows.in_shape,
                            self.rows.classes,
                            t.model.options,
                            "teacher.model",
                        )
                    ]
                )
            try:
                self._method(cfg, self._student(0), teacher)
            except RecipeError as err:
                raise RecipeError(f"{field}.{err}") from None

    def _context(self, student: torch.nn.Module, teacher: TeacherNet | None) -> ClassifierContext:
        rows, every = self.rows, self.recipe.eval.every
        return ClassifierContext(
            student=student, teacher=teacher, classes=rows.classes, spec=model_config(student),
            augment=self.augment if self.augment.enabled else None,
            validation=(rows.x[rows.val], rows.y[rows.val]) if every and len(rows.val) else None, eval_every=every,
        )  # fmt: skip

    def _method(
        self, cfg: MethodConfigBase, student: torch.nn.Module, teacher: TeacherNet | None
    ) -> ClassifierMethod:
        method = METHODS.get(cfg.name)(self._context(student, teacher), cfg)  # type: ignore[call-arg]
        assert isinstance(method, ClassifierMethod)
        return method

    def make_method(self, cfg: MethodConfigBase, seed: int) -> Method:
        if isinstance(cfg, BornAgainConfig):
            return self._born_again(cfg, seed)
        if isinstance(cfg, VQGraphConfig):
            codebook, targets = self._codes(cfg)
            return VQGraph(self._context(self._student(seed), self.teacher), cfg, codebook, targets)
        return self._method(cfg, self._student(seed), self.teacher)

    def _born_again(self, cfg: BornAgainConfig, seed: int) -> Method:
        """Generation 0 learns from labels; round r learns from generation r-1 with gt_weights[r-1]; the
        returned method is the last round (the pipeline trains it). Earlier generations train here, each
        for train.steps, under runs/<name>/born-again/<label>/seed-<s>/."""
        folder = self.recipe.run_dir() / "born-again" / cfg.display / f"seed-{seed}"
        previous: ClassifierMethod = CrossEntropy(self._context(self._student(seed), None), CEConfig())
        for r in range(len(cfg.gt_weights)):
            out = folder / f"generation-{r}"
            self.progress.log(f"{cfg.display}: generation {r} of {len(cfg.gt_weights)}")
            train(method=previous, stream=self._stream(previous, seed + r), cfg=self.recipe.train, out_dir=out,
                  seed=seed + r, progress=self.progress, accelerator=self.acc)  # fmt: skip
            teacher = TeacherNet([copy.deepcopy(previous.student).eval()])
            previous = BornAgainRound(self._context(self._student(seed + r + 1), teacher), cfg, r)
        return previous

    def _codes(self, cfg: VQGraphConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """The codebook (k-means over the GNN's last hidden layer, by the run's seed) and every node's
        soft assignment to it, as log-probabilities; computed once per (codes, temperature)."""
        from distill.graphs.gnn import kmeans, node_hidden

        key = (cfg.codes, cfg.code_temperature)
        if key not in self._code_cache:
            assert self.rows.graph is not None
            hidden = node_hidden(self.teacher_info["graph_module"], self.rows.graph)
            codebook, _ = kmeans(hidden, cfg.codes, seed=self.recipe.seed)
            self._code_cache[key] = (codebook, code_log_probs(hidden, codebook, cfg.code_temperature))
        return self._code_cache[key]

    def _stream(self, method: ClassifierMethod, seed: int) -> TensorStream:
        use = method.uses_unlabelled and self.recipe.data.unlabelled
        return TensorStream(
            self.rows.x, self.rows.y_train, stream_rows(self.rows, use), self.recipe.data.batch_size, seed
        )

    def make_stream(self, method: Method, seed: int) -> Stream:
        assert isinstance(method, ClassifierMethod)
        return self._stream(method, seed)

    def evaluate(self, method: Method | None, progress: Progress) -> dict[str, Any] | None:
        rows = self.rows
        x, y, idx = rows.x[rows.test], rows.y[rows.test], rows.test
        model = method.student if isinstance(method, ClassifierMethod) else self._student(self.recipe.seed)
        out = scores(predictions(model, x, idx), y, rows.classes)
        best = method.best_student() if isinstance(method, ClassifierMethod) else None
        if best is not None and isinstance(method, ClassifierMethod):
            out.update(scores(predictions(best, x, idx), y, rows.classes, "best_"))
            out["best_step"] = method.best["step"]
            out["best_validation_accuracy"] = method.best["accuracy"]
        out["inference_ms_per_1k"] = self._inference_ms(model, x)
        return out

    def _inference_ms(self, model: torch.nn.Module, x: torch.Tensor) -> float:
        """Milliseconds per 1,000 test rows for the student alone (median of 5; the GNN's is in describe)."""
        model.eval()
        times = []
        with torch.no_grad():
            for _ in range(5):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
        return sorted(times)[2] * 1000 * 1000 / max(1, len(x))

    def _teacher_scores(self) -> dict[str, Any]:
        if self.teacher is None:
            return {}
        rows = self.rows
        out = scores(predictions(self.teacher, rows.x[rows.test], rows.test), rows.y[rows.test], rows.classes)
        module = self.teacher_info.get("graph_module")
        if module is not None:  # the GNN needs the whole graph for any prediction: time that
            times = []
            with torch.no_grad():
                for _ in range(5):
                    t0 = time.perf_counter()
                    module(rows.x)
                    times.append(time.perf_counter() - t0)
            out["inference_ms_per_1k"] = sorted(times)[2] * 1000 * 1000 / max(1, len(rows.test))
        return out

    def describe(self) -> dict[str, Any]:
        r, t = self.recipe, self.recipe.teacher
        teacher_name = None
        if t is not None:
            teacher_name = t.model.arch + (f" x{t.ensemble} ensemble" if t.ensemble > 1 else "")
        info = {k: v for k, v in self.teacher_info.items() if k != "graph_module"}
        student = self._student(r.seed)
        return {
            "teacher": teacher_name,
            "teacher_info": info,
            "student": {"arch": r.student.arch, "parameters": sum(p.numel() for p in student.parameters())},
            "data": {"classifier": self.rows.describe()},
            "references": {"teacher": self._teacher_scores()} if self.teacher is not None else {},
            "class_names": self.rows.class_names,
        }

    def timings(self) -> dict[str, float]:
        return dict(self.timing)

    def result_columns(self) -> list[dict[str, str]]:
        cols = [
            {"key": "accuracy", "title": "test accuracy (last)", "format": "pct", "better": "higher"},
            {
                "key": "balanced_accuracy",
                "title": "balanced acc. (last)",
                "format": "pct",
                "better": "higher",
            },
        ]
        if self.recipe.eval.every:
            cols.append(
                {
                    "key": "best_accuracy",
                    "title": "test accuracy (best on validation)",
                    "format": "pct",
                    "better": "higher",
                }
            )
        cols.append(
            {"key": "inference_ms_per_1k", "title": "ms / 1k rows", "format": "num", "better": "lower"}
        )
        return cols

    def results_note(self) -> str:
        d = self.rows.describe()
        return (
            f"Test accuracy on {d['test_rows']} held-out rows of {d['name']} ({d['classes']} classes), measured once at the "
            f"end. Training rows: {d['train_rows']}, of which {d['labelled_rows']} labelled; validation: "
            f"{d['validation_rows']} rows carved from training, used only to pick the best-on-validation student."
        )
