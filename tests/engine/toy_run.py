"""Train a toy method through the real engine in a process of its own, so tests can SIGKILL it.

python -m tests.engine.toy_run METHOD OUT_DIR STEPS CHECKPOINT_EVERY [--resume]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from distill.engine.trainer import train
from distill.recipe import TrainConfig
from tests.engine.toy_methods import (
    ClassifierKD,
    EMAClassifierKD,
    ImageStream,
    TwoPhaseAdversarial,
    small_cnn,
    toy_images,
)


def build(name: str):  # type: ignore[no-untyped-def]
    if name == "two_phase":
        return TwoPhaseAdversarial(critic_updates=3)
    cls = EMAClassifierKD if name == "ema" else ClassifierKD
    return cls(small_cnn(seed=1), small_cnn(seed=2, width=8))


def run(name: str, out: Path, steps: int, every: int, resume: bool) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    method = build(name)
    x, y = toy_images()
    cfg = TrainConfig(steps=steps, lr=1e-2, checkpoint_every=every, warmup_steps=2)
    result = train(
        method=method, stream=ImageStream(x, y, 8, seed=0), cfg=cfg, out_dir=out, seed=0, resume=resume
    )
    weights = {
        f"{m}.{k}": v.detach().clone().contiguous()
        for m, mod in method.modules().items()
        for k, v in mod.state_dict().items()
    }
    for key, value in method.state_dict().get("ema", {}).items():
        weights[f"ema.{key}"] = value.contiguous()
    save_file(weights, str(out / "final.safetensors"))
    (out / "resumed_from.txt").write_text(str(result.resumed_from))
    return weights


if __name__ == "__main__":
    name, out, steps, every = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    run(name, out, steps, every, "--resume" in sys.argv)
