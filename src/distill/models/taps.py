"""Read intermediate activations of a model during its ordinary forward: forward hooks that keep a
module's output under a name for as long as a `with` block lasts. Methods tap teacher and student the same
way, so the two sides of a representation loss cannot be read at different points."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _keeper(store: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        # decoder blocks return a tuple in some transformers versions, a tensor in others
        tensor = output[0] if isinstance(output, tuple | list) else output
        assert isinstance(tensor, torch.Tensor)
        store[name] = tensor

    return hook


@contextmanager
def capture_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block, the dict fills with each named module's latest output; hooks go on exit."""
    store: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_hook(_keeper(store, name)) for name, module in modules.items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()
