"""A family (language models today; classifiers, dataset and diffusion distillation next) plugs into the
one pipeline: it prepares what every method of a run shares (teacher, data, the student's init), builds
each method and its stream, evaluates on held-out data, and names the numbers the report shows."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from distill.configs.base import MethodConfigBase
from distill.methods.base import Method, Stream
from distill.progress import Progress
from distill.recipe_base import RecipeBase
from distill.registry import Registry


class Family(ABC):
    name: str = "abstract"

    @abstractmethod
    def prepare(self, recipe: RecipeBase, acc: Accelerator, progress: Progress) -> None:
        """Load and tokenise once per run; slow shared work (teacher generation) on the main process
        first, the others then read what it stored."""

    @abstractmethod
    def make_method(self, cfg: MethodConfigBase, seed: int) -> Method:
        """A fresh method (with a fresh copy of the student's init) for one training run."""

    @abstractmethod
    def make_stream(self, method: Method, seed: int) -> Stream:
        """The batches `method` trains on (a method may train on more rows, e.g. unlabelled ones)."""

    @abstractmethod
    def evaluate(self, method: Method | None, progress: Progress) -> dict[str, Any] | None:
        """Held-out numbers of a trained method's student, or of the untrained init (None)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The summary's teacher / student / data sections."""

    def timings(self) -> dict[str, float]:
        """Seconds spent in `prepare`, by stage (loading, generation), for the report's timing table."""
        return {}

    def result_columns(self) -> list[dict[str, str]]:
        """The held-out numbers the report and CLI show: {key, title, format: num|pct, better:
        lower|higher}, with `results_note()` saying what they are. Empty: the LM family's table."""
        return []

    def results_note(self) -> str:
        return ""

    def figures(self, run_dir: Path, summary: dict[str, Any]) -> dict[str, str]:
        """Write the family's own figures into `run_dir` (main process); return {file name: caption}."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release servers, files and memory."""


FAMILIES: Registry[type[Family]] = Registry("family")
