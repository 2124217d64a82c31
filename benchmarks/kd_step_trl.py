"""kd_step benchmark, part 4: TRL's GKD trainer (lmbda=0: no on-policy generation; beta=0, which TRL
defines as forward KL) on the same data, timed and token-counted like distill's loop."""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from distill.data.batching import IGNORE, Batch
from kd_step_data import Pair
from kd_step_measure import LoopRun, now

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # read when trl.experimental is imported


def trl_available() -> tuple[bool, str]:
    try:
        import trl
    except ImportError:
        return False, "trl is not installed (pip install -e .[bench])"
    try:
        gkd_classes()
    except ImportError as err:
        return False, f"trl {trl.__version__} has no GKD trainer ({err})"
    return True, f"trl {trl.__version__}"


def gkd_classes() -> tuple[type, type]:
    try:  # trl >= 0.24 moved GKD to trl.experimental
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer  # type: ignore[attr-defined,no-redef]
    return GKDConfig, GKDTrainer


class CountingCollator:
    """Wraps TRL's collator and records the real (attention-mask) tokens and slots of every batch it builds."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.inner = inner
        self.real: list[int] = []
        self.slots: list[int] = []

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.inner(examples)
        mask = out["attention_mask"]
        self.real.append(int(mask.sum()))
        self.slots.append(int(mask.numel()))
        return out


def make_trl_trainer(
    pair: Pair, rows: list[dict[str, Any]], steps: int, batch_size: int, max_length: int, out_dir: str
) -> tuple[Any, CountingCollator, list[tuple[float, float]]]:
    """TRL's GKDTrainer: lmbda=0 (no student generation), beta=0 (TRL: exactly forward KL), same student
    init, teacher, optimizer settings (AdamW, lr, clip) as the quickstart; no eval, no saving, no logging."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    gkd_config, gkd_trainer = gkd_classes()
    stamps: list[tuple[float, float]] = []

    class Stamp(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(now())

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(now())

    train_cfg = pair.recipe.train
    args = gkd_config(
        output_dir=out_dir,
        per_device_train_batch_size=batch_size,
        max_length=max_length,
        lmbda=0.0,
        beta=0.0,
        max_steps=steps,
        learning_rate=train_cfg.lr,
        lr_scheduler_type="constant",
        max_grad_norm=train_cfg.max_grad_norm,
        weight_decay=train_cfg.weight_decay,
        gradient_accumulation_steps=1,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=pair.device.type == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=pair.recipe.seed,
        bf16=False,
        fp16=False,
    )
    trainer = gkd_trainer(
        model=copy.deepcopy(pair.student),
        teacher_model=pair.teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=pair.tokenizer,
        callbacks=[Stamp()],
    )
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training metrics dict
    return trainer, counter, stamps


def run_trl_loop(
    pair: Pair, rows: list[dict[str, Any]], steps: int, warmup: int, batch_size: int, max_length: int
) -> LoopRun:
    with tempfile.TemporaryDirectory(prefix="kd_step_trl_") as tmp, quiet():
        trainer, counter, stamps = make_trl_trainer(pair, rows, warmup + steps, batch_size, max_length, tmp)
        trainer.train()
    # stamps[0] is train begin, stamps[k] the end of step k; the collator's k-th batch feeds step k.
    n = len(stamps) - 1
    timed = range(warmup, n)
    (w0, c0), (w1, c1) = stamps[warmup], stamps[n]
    return LoopRun(
        seconds=w1 - w0,
        cpu_seconds=c1 - c0,
        real_tokens=sum(counter.real[i] for i in timed),
        slots=sum(counter.slots[i] for i in timed),
        steps=len(timed),
    )


def trl_memory_run(pair: Pair, batch: Batch, steps: int, workdir: Path) -> Callable[[], None]:
    """TRL on the identical rows (pre-tokenised; completion_mask marks the first answer token)."""
    rows = []
    for ids, tg in zip(batch.input_ids.tolist(), batch.targets.tolist(), strict=True):
        first = next((i for i, t in enumerate(tg) if t != IGNORE), len(tg) - 1) + 1
        rows.append(
            {"prompt": "", "input_ids": ids, "completion_mask": [0] * first + [1] * (len(ids) - first)}
        )
    trainer, _, _ = make_trl_trainer(
        pair, rows, steps, len(rows), len(rows[0]["input_ids"]), str(workdir / "trl")
    )
    return lambda: trainer.train()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
