"""on_policy benchmark, TRL side: TRL's GKDTrainer with lmbda=1 on the same prompt batches, timed per step
and token-counted from the batches it generates itself; plus the per-step counts both sides record.

Per step TRL (1.16, `trl.experimental.gkd`) does: collate the batch (left-padded prompts), sample the
completions with HF `model.generate` (gradient checkpointing switched off around it; padded rows and rows
that already ended keep running until every row has ended or the budget is spent), then one student
forward with gradients and one teacher forward without, each over the whole padded prompt + completion and
each materialising the full (B, L, vocab) logits, the generalized JSD over the completion positions,
backward, grad clipping, AdamW.

TRL's defaults are kept, including `gradient_checkpointing=True` (SFTConfig's default since TRL 0.20):
with it GKD passes `use_cache=False` to `generate`, so every new token re-runs the whole sequence, and
the training forward is recomputed in backward. The benchmark therefore also runs TRL with
`gradient_checkpointing=False` (KV-cached generate, no recompute), its fastest configuration here.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kd_step_data import Pair
from kd_step_measure import LoopRun, now, sync
from kd_step_trl import gkd_classes, quiet


@dataclass
class StepCount:
    """What one on-policy step worked on (real tokens only: no padding)."""

    generated: int  # sampled completion tokens, the EOS included where a row stopped on it
    prompt: int  # prompt tokens, scored by the student and the teacher along with the completion
    slots: int  # positions of the training forward, padding included


@dataclass
class OnPolicyRun(LoopRun):
    """Timed steps of one variant (warm-up excluded); `real_tokens` = prompt + generated tokens."""

    generated: int

    @property
    def generated_per_s(self) -> float:
        return self.generated / self.seconds


def timed_run(stamps: list[tuple[float, float]], counts: list[StepCount], warmup: int) -> OnPolicyRun:
    """`stamps[k]` (wall, CPU) is the end of step k (stamps[0]: before the first); counts[k] feeds step k+1."""
    timed = counts[warmup:]
    (w0, c0), (w1, c1) = stamps[warmup], stamps[-1]
    return OnPolicyRun(
        seconds=w1 - w0,
        cpu_seconds=c1 - c0,
        real_tokens=sum(c.generated + c.prompt for c in timed),
        slots=sum(c.slots for c in timed),
        steps=len(timed),
        generated=sum(c.generated for c in timed),
    )


def trl_rows(prompts: list[list[int]], eos: int) -> list[dict[str, Any]]:
    """Pre-tokenised rows, so TRL's prompts are exactly distill's ids (the collator cuts `prompts` at the
    first `completion_mask` 1). The one answer token only matters off-policy; with lmbda=1 TRL replaces
    it with the student's sample."""
    return [{"prompt": "", "input_ids": [*p, eos], "completion_mask": [0] * len(p) + [1]} for p in prompts]


@dataclass
class GKDRun:
    trainer: Any
    counts: list[StepCount] = field(default_factory=list)
    stamps: list[tuple[float, float]] = field(default_factory=list)


def make_gkd_trainer(
    pair: Pair,
    prompts: list[list[int]],
    steps: int,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    out_dir: str,
    checkpointing: bool | None = None,
) -> GKDRun:
    """GKDTrainer, lmbda=1 (every step on-policy), beta=0.5 (TRL's default, symmetric JSD), the given
    sampling temperature (top_k 0, top_p 1: TRL's fixed choice), a fresh copy of the student, the shared
    teacher, AdamW (fused, as the engine's) with the quickstart's lr / betas / weight decay / clip at a
    constant lr; prompts in order (sequential sampler); no eval, no saving, no logging. `checkpointing`:
    gradient checkpointing, None for TRL's default (on in TRL 1.16, which also turns the KV cache of its
    generation off)."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    config_cls, trainer_cls = gkd_classes()
    train = pair.recipe.train
    run_stamps: list[tuple[float, float]] = []

    class StepStamps(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            run_stamps.append(now())

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            sync(pair.device)
            run_stamps.append(now())

    gkd: dict[str, Any] = {
        "lmbda": 1.0,
        "beta": 0.5,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
    }
    optim = {
        "optim": "adamw_torch_fused",
        "learning_rate": train.lr,
        "adam_beta1": train.betas[0],
        "adam_beta2": train.betas[1],
        "weight_decay": train.weight_decay,
        "max_grad_norm": train.max_grad_norm,
        "lr_scheduler_type": "constant",
    }
    if checkpointing is not None:
        gkd["gradient_checkpointing"] = checkpointing
    plain = {  # no eval, saving, logging, progress bar or loader workers: the bare training loop
        "logging_strategy": "no",
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
    }
    args = config_cls(
        output_dir=out_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        max_steps=steps,
        max_length=max(len(p) for p in prompts) + 1,  # the pre-tokenised rows: never cut
        train_sampling_strategy="sequential",
        use_cpu=pair.device.type == "cpu",
        bf16=False,  # fp32, as distill's quickstart
        fp16=False,
        seed=pair.recipe.seed,
        **gkd,
        **optim,
        **plain,
    )
    eos = int(pair.tokenizer.eos_token_id)
    trainer = trainer_cls(
        model=copy.deepcopy(pair.student),
        teacher_model=pair.teacher,
        args=args,
        train_dataset=Dataset.from_list(trl_rows(prompts, eos)),
        processing_class=pair.tokenizer,
        callbacks=[StepStamps()],
    )
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training metrics dict
    run = GKDRun(trainer, stamps=run_stamps)
    trainer.generate_on_policy_outputs = _counting(trainer.generate_on_policy_outputs, run.counts)
    return run


def _counting(generate: Callable[..., Any], counts: list[StepCount]) -> Callable[..., Any]:
    """TRL's own `generate_on_policy_outputs`, unchanged, recording what it produced: its attention mask
    marks the real prompt tokens and the completion up to and including the first EOS."""

    def counted(model: Any, inputs: dict[str, Any], generation_config: Any) -> Any:
        ids, mask, labels = generate(model, inputs, generation_config)
        width = inputs["prompts"].shape[1]
        counts.append(
            StepCount(
                generated=int(mask[:, width:].sum()), prompt=int(mask[:, :width].sum()), slots=ids.numel()
            )
        )
        return ids, mask, labels

    return counted


def run_trl(
    pair: Pair,
    batches: list[list[list[int]]],
    warmup: int,
    max_new_tokens: int,
    temperature: float,
    checkpointing: bool | None = None,
) -> tuple[OnPolicyRun, str]:
    """One fresh trainer through all `batches` (the first `warmup` untimed); also TRL's generation config."""
    prompts = [p for batch in batches for p in batch]
    with tempfile.TemporaryDirectory(prefix="on_policy_trl_") as tmp, quiet():
        run = make_gkd_trainer(
            pair, prompts, len(batches), len(batches[0]), max_new_tokens, temperature, tmp, checkpointing
        )
        run.trainer.train()
    if len(run.counts) != len(batches):  # lmbda=1: TRL must have sampled in every step
        raise RuntimeError(f"TRL generated in {len(run.counts)} of {len(batches)} steps")
    return timed_run(run.stamps, run.counts, warmup), generation_config_note(run)


def generation_config_note(run: GKDRun) -> str:
    cfg = run.trainer.generation_config
    return (
        f"do_sample {cfg.do_sample}, temperature {cfg.temperature}, top_k {cfg.top_k}, top_p {cfg.top_p}, "
        f"use_cache {cfg.use_cache}, eos {cfg.eos_token_id}, pad {cfg.pad_token_id}; "
        f"gradient_checkpointing {run.trainer.args.gradient_checkpointing}"
    )
