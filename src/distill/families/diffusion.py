"""The diffusion family: a teacher (trained by the run or loaded), students distilled to few steps, and
sample quality judged on held-out data beside the teacher sampled with the same and with more steps, so
every row answers "is the distilled 1-step sampler better than the teacher with 1 step, and how many
teacher steps does it replace?"."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from distill.classifier.batches import TensorStream
from distill.configs.base import MethodConfigBase
from distill.configs.diffusion import DiffusionMethodConfig
from distill.diffusion.data import DiffusionData, load_data
from distill.diffusion.diffusers_teacher import DiffusersAdapter
from distill.diffusion.judge import DigitsJudge, train_judge
from distill.diffusion.models import Denoiser, guided_x0
from distill.diffusion.paths import NoisePath
from distill.diffusion.sampling import SamplerKind, generate
from distill.diffusion.scoring import columns, eval_labels, primary_key, score_samples
from distill.diffusion.teacher import build_net, make_teacher
from distill.errors import RecipeError
from distill.families.base import FAMILIES, Family
from distill.methods import diffusion as _registers  # noqa: F401 - registers the diffusion methods
from distill.methods.base import METHODS, Method, Stream
from distill.methods.diffusion.base import DiffusionContext, DiffusionMethod
from distill.paths import resolve_path
from distill.progress import Progress
from distill.recipe_base import RecipeBase
from distill.recipe_diffusion import DiffusionRecipe

EVAL_SEED_OFFSET = 4242  # the evaluation noise differs from any training noise


@FAMILIES.register("diffusion")
class DiffusionFamily(Family):
    name = "diffusion"

    def prepare(self, recipe: RecipeBase, acc: Accelerator, progress: Progress) -> None:
        assert isinstance(recipe, DiffusionRecipe)
        self.recipe, self.progress = recipe, progress
        t0 = time.perf_counter()
        self.data: DiffusionData = load_data(recipe.data, recipe.seed)
        self.timing = {"load_s": time.perf_counter() - t0}
        t0 = time.perf_counter()
        self.teacher, self.teacher_info = make_teacher(recipe, self.data, acc, progress)
        self.path: NoisePath = self.teacher.path
        self.timing["teacher_s"] = time.perf_counter() - t0
        self.judge: DigitsJudge | None = None
        if len(self.data.shape) > 1:
            store = resolve_path(recipe.teacher.store)
            self.judge, self.teacher_info["judge_test_accuracy"] = train_judge(
                self.data, recipe.eval.classifier_steps, recipe.seed, store
            )
        t0 = time.perf_counter()
        self.labels = eval_labels(self.data, recipe.eval.samples)
        self.reference: torch.Tensor | None = None
        self.references = self._references()
        self.timing["references_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ sampling and scoring

    def _teacher_fn(self) -> Any:
        scale = self.recipe.teacher.guidance
        return lambda x, t, lab: guided_x0(self.teacher, x, t, lab, scale)

    def sample(self, fn: Any, steps: int, kind: SamplerKind) -> tuple[torch.Tensor, float]:
        e = self.recipe.eval
        t0 = time.perf_counter()
        out = generate(fn, self.path, self.data.shape, e.samples, steps, kind, self.recipe.seed + EVAL_SEED_OFFSET,
                       self.labels, e.batch_size)  # fmt: skip
        return out, e.samples / max(time.perf_counter() - t0, 1e-9)

    def score(self, samples: torch.Tensor, reference: torch.Tensor | None = None) -> dict[str, float]:
        return score_samples(samples, self.data, reference, self.judge, self.labels)

    def _references(self) -> dict[str, dict[str, Any]]:
        """The teacher with its reference sampler (the target every student is compared to), with each
        of `teacher_steps` Euler / DDIM steps, and held-out data against training data (the floor)."""
        s = self.recipe.teacher.sampler
        self.progress.log(f"sampling the teacher ({s.kind}, {s.steps} steps) and its few-step baselines")
        ref, per_s = self.sample(self._teacher_fn(), s.steps, s.kind)
        self.reference = ref
        refs: dict[str, dict[str, Any]] = {
            f"teacher, {s.kind} {s.steps} steps (reference)": {
                **self.score(ref),
                "steps": s.steps,
                "samples_per_s": per_s,
            }
        }
        self.teacher_curve: dict[int, float] = {}
        for n in sorted(set(self.recipe.eval.teacher_steps)):
            out, per_s = self.sample(self._teacher_fn(), n, "ode")
            scored = self.score(out, ref)
            refs[f"teacher, {n} Euler step{'s' if n > 1 else ''}"] = {
                **scored,
                "steps": n,
                "samples_per_s": per_s,
            }
            self.teacher_curve[n] = scored.get(primary_key(self.data), float("inf"))
        n = min(len(self.data.x), self.recipe.eval.samples)  # as many rows as a method's samples
        real = self.data.x[torch.randperm(len(self.data.x), generator=torch.Generator().manual_seed(0))[:n]]
        floor = score_samples(real, self.data, ref, self.judge, None)
        refs["training data (floor)"] = floor
        return refs

    def teacher_steps_to_match(self, value: float) -> int | None:
        """The fewest teacher Euler steps whose score is at least as good as `value` (None: none is)."""
        ok = [n for n, v in sorted(self.teacher_curve.items()) if v <= value]
        return ok[0] if ok else None

    # ------------------------------------------------------------------ methods

    def _make_student(self, init: str, guidance: bool) -> Denoiser:
        if init == "teacher" and isinstance(self.teacher.net, DiffusersAdapter):
            if guidance:
                raise RecipeError(
                    "method: a diffusers teacher's copy has no guidance-scale input (cfg_distill)"
                )
            copied = copy.deepcopy(self.teacher.net).train()
            copied.requires_grad_(True)
            return Denoiser(copied, self.path)
        options = self.recipe.student.model or self.recipe.teacher.model
        net = build_net(self.data, options, guidance, "student.model")
        if init == "teacher":
            missing, unexpected = net.load_state_dict(self.teacher.net.state_dict(), strict=False)
            assert not unexpected and all(k.startswith("cond.guidance") for k in missing), (
                missing,
                unexpected,
            )
        return Denoiser(net, self.path)

    def make_method(self, cfg: MethodConfigBase, seed: int) -> Method:
        assert isinstance(cfg, DiffusionMethodConfig)
        ctx = DiffusionContext(path=self.path, shape=self.data.shape, classes=self.data.classes,
                               teacher=self.teacher, guidance=self.recipe.teacher.guidance,
                               make_student=self._make_student)  # fmt: skip
        method = METHODS.get(cfg.name)(ctx, cfg)  # type: ignore[call-arg]
        if hasattr(method, "set_total_steps"):  # progressive rounds split the run's steps
            method.set_total_steps(self.recipe.train.steps)
        return method

    def make_stream(self, method: Method, seed: int) -> Stream:
        d = self.data
        return TensorStream(d.x, d.y, torch.arange(len(d.x)), self.recipe.data.batch_size, seed)

    def evaluate(self, method: Method | None, progress: Progress) -> dict[str, Any] | None:
        if not isinstance(method, DiffusionMethod):
            return None
        guidance = getattr(method.cfg, "eval_scale", None) if method.guidance_input() else None
        samples, per_s = self.sample(method.x0_fn(guidance), method.sample_steps, method.sampler)
        method.samples = samples
        out: dict[str, Any] = {**self.score(samples, self.reference), "steps": method.sample_steps,
                               "samples_per_s": per_s}  # fmt: skip
        key = primary_key(self.data)
        if key in out:
            match = self.teacher_steps_to_match(out[key])
            out["teacher_steps_to_match"] = match
        return out

    def figures(self, run_dir: Path, summary: dict[str, Any]) -> dict[str, str]:
        from distill.diffusion.plots import plot_samples

        return plot_samples(run_dir, summary, self.data, self.reference)

    def describe(self) -> dict[str, Any]:
        r = self.recipe
        return {
            "teacher": {
                "objective": r.teacher.objective,
                "source": r.teacher.path or "trained by the run",
                "noise_path": self.path.describe(),
                **self.teacher_info,
            },  # fmt: skip
            "student": {"model": r.student.model or r.teacher.model or "the teacher's architecture"},
            "data": {"diffusion": self.data.describe()},
            "references": self.references,
        }

    def timings(self) -> dict[str, float]:
        return dict(self.timing)

    def result_columns(self) -> list[dict[str, str]]:
        return columns(self.data) + [
            {
                "key": "teacher_steps_to_match",
                "title": "teacher steps to match",
                "format": "num",
                "better": "higher",
            }
        ]

    def results_note(self) -> str:
        e, key = self.recipe.eval, primary_key(self.data)
        return (
            f"{e.samples} samples per method from the same starting noise, scored against "
            f"{len(self.data.x_test)} held-out rows. 'teacher steps to match': the fewest teacher Euler/DDIM steps "
            f"(of {sorted(set(e.teacher_steps))}) whose {key} is at least as good as the student's ('—': none of them is); the student's "
            "speed-up at equal quality is that number over its own steps."
        )
