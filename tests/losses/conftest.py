from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """These tests use tiny tensors: intra-op threads only add OpenMP wake-ups, which stall badly when
    the machine is oversubscribed (observed: 8 s -> 50 s). Restored afterwards for other test folders."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
