"""Open a recipe's teacher section, whatever its kind, as one handle: the training signal source, the
tokenizer, and the local weights when there are any (pruning a student, local generation, held-out
evaluation against the exact distribution)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.errors import CompatibilityError, InputError
from distill.models.loading import load_model, load_tokenizer, tokenizer_fingerprint
from distill.paths import resolve_path
from distill.recipe import (
    CachedTeacherConfig,
    LiveTeacherConfig,
    ServedTeacherConfig,
    TeacherConfig,
    local_teacher_source,
)
from distill.teachers.base import TeacherSource
from distill.teachers.live import LiveTeacherSource


@dataclass
class TeacherHandle:
    kind: str
    ident: str  # what identifies the teacher's weights (fingerprints generated data)
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel | None
    remote: TeacherSource | None  # the served or cached source; None for a live teacher
    prefix_cache: bool = True  # a local model reuses the batch's shared prompt prefix

    def source(self, vocab_size: int) -> TeacherSource:
        """The signal source training uses."""
        if self.remote is not None:
            return self.remote
        assert self.model is not None
        return LiveTeacherSource(self.model, vocab_size, prefix_cache=self.prefix_cache)

    def exact(self, vocab_size: int) -> LiveTeacherSource | None:
        """The full-distribution teacher for held-out evaluation, when its weights are here."""
        return (
            LiveTeacherSource(self.model, vocab_size, prefix_cache=self.prefix_cache)
            if self.model is not None
            else None
        )

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()


def _has_weights(folder_path: str, gguf_file: str | None) -> bool:
    folder = resolve_path(folder_path)
    if gguf_file:
        return (folder / gguf_file).is_file()
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def teacher_ident(cfg: TeacherConfig) -> str:
    """What identifies the teacher's local weights ("" when there is no local copy)."""
    local = local_teacher_source(cfg)
    return f"{resolve_path(local.path)}/{local.gguf_file or ''}" if local else ""


def open_teacher(cfg: TeacherConfig, *, need_weights: bool) -> TeacherHandle:
    """Load what the teacher section names. `need_weights`: the run prunes the student from the teacher,
    generates locally or evaluates, so a served or cached teacher's local copy must hold weights."""
    local = local_teacher_source(cfg)
    ident = teacher_ident(cfg)
    if isinstance(cfg, LiveTeacherConfig):
        loaded = load_model(cfg.model)
        return TeacherHandle("live", ident, loaded.tokenizer, loaded.model, None, cfg.prefix_cache)
    model = None
    if local is not None and need_weights and _has_weights(local.path, local.gguf_file):
        loaded = load_model(local)
        tokenizer, model = loaded.tokenizer, loaded.model
    elif local is not None:
        tokenizer = load_tokenizer(local)
    else:
        raise InputError("teacher.tokenizer: a served or cached teacher needs a local copy of its tokenizer")
    if isinstance(cfg, ServedTeacherConfig):
        from distill.teachers.served_source import ServedTeacherSource

        served = ServedTeacherSource(cfg, tokenizer)
        served.check_server()  # fail now, with one line, rather than at the first training step
        remote: TeacherSource = served
        return TeacherHandle("served", ident or cfg.model, tokenizer, model, remote)
    if isinstance(cfg, CachedTeacherConfig):
        from distill.teachers.cache_reader import CachedTeacherSource

        cache = CachedTeacherSource(
            cfg.path, tokenizer_hash=tokenizer_fingerprint(tokenizer), memory_mb=cfg.memory_mb
        )
        return TeacherHandle("cache", ident or cache.manifest.teacher_id, tokenizer, model, cache)
    raise CompatibilityError(f"teacher.kind: unknown kind {getattr(cfg, 'kind', cfg)!r}")
