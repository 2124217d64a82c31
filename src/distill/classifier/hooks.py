"""Read any module's output by its dotted path, with forward hooks: feature methods need no change to
model code, and one forward pass of the model fills every tap."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from distill.classifier.models import find_module


class FeatureTaps:
    """Forward hooks on `paths` of `model`; after a forward, `outputs[path]` holds that module's output
    (the first tensor when a module returns a tuple). Unknown paths fail at construction, listing the
    nearest names."""

    def __init__(self, model: torch.nn.Module, paths: Iterable[str], role: str = "student") -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for path in dict.fromkeys(paths):
            module = find_module(model, path, role)
            self._handles.append(module.register_forward_hook(self._keeper(path)))

    def _keeper(self, path: str):  # type: ignore[no-untyped-def]
        def keep(_module: torch.nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, tuple | list):
                output = next(o for o in output if isinstance(o, torch.Tensor))
            assert isinstance(output, torch.Tensor)
            self.outputs[path] = output

        return keep

    def take(self, path: str) -> torch.Tensor:
        return self.outputs.pop(path)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
