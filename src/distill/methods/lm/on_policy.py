"""Methods that learn on the student's own samples: `on_policy` (GKD), `drafter` (DistillSpec, with
AdaSPEC-style token selection) and `minillm` (reverse-KL policy gradient).

Sampling happens in `prepare`, without gradients, through the project's generation engine; the batch's
rows are rewritten as prompt + the student's completion, and the loss units become the generated tokens.
A coin (a generator whose state is checkpointed, so a resumed run flips the same coins) decides per batch
whether the student samples (probability `lmbda`) or the dataset's completions are used; with `replay`
the coin goes through DistiLLM's adaptive schedule instead (`replay.py`), which may also hand back
stored student outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from distill.configs.on_policy import DrafterConfig, MiniLLMConfig, OnPolicyConfig
from distill.configs.teachers import ModelConfig
from distill.data.batching import IGNORE, Batch, collate
from distill.data.tokenize import TokenizedExample
from distill.errors import CompatibilityError, InputError
from distill.generation.engine import Mixer, generate_tokens
from distill.generation.sampling import SamplingSpec
from distill.losses.tokens import divergence_per_token
from distill.methods.base import METHODS, Phase, StepContext
from distill.methods.lm.base import LMContext, StudentRows
from distill.methods.lm.logit_kd import LogitKD
from distill.methods.lm.replay import AdaptiveReplay
from distill.models.body import batch_hidden
from distill.teachers.base import AnySignal, SparseTeacherSignal, TeacherSignal
from distill.teachers.live import LiveTeacherSource


@dataclass
class SampledBatch(Batch):
    """A batch whose completions the student wrote: `generated` tokens just now, or earlier and
    `replayed` from the buffer (0 generated)."""

    generated: int = 0
    on_policy: bool = False
    replayed: bool = False

    def stats(self) -> dict[str, float]:
        return {
            **super().stats(),
            "generated_tokens": self.generated,
            "on_policy_batches": int(self.on_policy),
            "replayed_batches": int(self.replayed),
        }

    def to(self, device: torch.device) -> SampledBatch:
        return self if self.input_ids.device == device else _with(self, device)


def _with(b: SampledBatch, device: torch.device) -> SampledBatch:
    moved = Batch.to(b, device)
    return SampledBatch(**vars(moved), generated=b.generated, on_policy=b.on_policy, replayed=b.replayed)


def batch_prompts(batch: Batch) -> list[list[int]]:
    """Each row's prompt: the tokens up to the first answer token (the whole row if it has no answer)."""
    if batch.attention_mask is None:
        raise CompatibilityError("data.packing: on-policy methods need unpacked batches")
    prompts = []
    for b in range(batch.input_ids.shape[0]):
        answer = torch.nonzero(batch.targets[b] != IGNORE).flatten()
        end = int(answer[0]) + 1 if len(answer) else int(batch.attention_mask[b].sum())
        prompts.append(batch.input_ids[b, :end].tolist())
    return prompts


@METHODS.register("on_policy")
class OnPolicyKD(LogitKD):
    """GKD: the divergence of `logit_kd`, on the student's own completions with probability `lmbda`."""

    name = "on_policy"

    def __init__(self, cfg: OnPolicyConfig | DrafterConfig | MiniLLMConfig, ctx: LMContext) -> None:
        super().__init__(cfg, ctx)  # type: ignore[arg-type]
        self.sampling = SamplingSpec(cfg.sample.temperature, cfg.sample.top_p, cfg.sample.top_k)
        self.rng = torch.Generator().manual_seed(1_000_003 * ctx.seed + 17)
        tokenizer = ctx.tokenizer
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        eos = eos if eos is not None else ctx.student.config.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or (self.eos_ids[0] if self.eos_ids else 0)
        replay = getattr(cfg, "replay", None)
        self.replay = AdaptiveReplay(replay) if replay is not None else None

    def set_total_steps(self, steps: int) -> None:
        """The run's optimizer steps (train.steps): replay's fresh-sample share decays over them."""
        if self.replay is not None:
            self.replay.total_steps = steps

    @property
    def lmbda(self) -> float:
        return float(getattr(self.cfg, "lmbda", 1.0))

    def prepare(self, batch: Any, phase: Phase) -> Any:
        coin = float(torch.rand((), generator=self.rng))
        if self.replay is not None:
            return self._replay_prepare(batch, coin)
        if coin >= self.lmbda:
            return batch
        return self.sample_batch(batch)

    def _replay_prepare(self, batch: Batch, coin: float) -> Batch:
        assert self.replay is not None
        choice = self.replay.choose(coin)
        if choice == "dataset":
            return batch
        if choice == "replay":
            rows = self.replay.buffer.sample(batch.input_ids.shape[0], self.rng)
            return _as_batch(rows, self.pad_id, replayed=True).to(batch.input_ids.device)
        rows = self.sample_rows(batch)
        self.replay.buffer.add(rows)
        return _as_batch(rows, self.pad_id).to(batch.input_ids.device)

    def sample_batch(self, batch: Batch) -> SampledBatch:
        """The batch's prompts completed by the student (or the teacher/student mixture)."""
        return _as_batch(self.sample_rows(batch), self.pad_id).to(batch.input_ids.device)

    @torch.no_grad()
    def sample_rows(self, batch: Batch) -> list[TokenizedExample]:
        """Each of the batch's prompts followed by the student's completion."""
        prompts = batch_prompts(batch)
        student = self.body.lm
        was_training = student.training
        student.eval()
        mixer = None
        if self.cfg.teacher_mix > 0:
            teacher = self.lm.teacher
            assert isinstance(teacher, LiveTeacherSource)  # validated: mixing needs a live teacher
            mixer = Mixer(teacher.model, self.cfg.teacher_mix, self.lm.vocab_size)
        rows = generate_tokens(
            student,
            prompts,
            self.sampling,
            self.cfg.sample.max_new_tokens,
            self.eos_ids,
            pad_id=self.pad_id,
            batch_size=len(prompts),
            generator=self.rng,
            mixer=mixer,
        )
        student.train(was_training)
        return [
            TokenizedExample(input_ids=p + r.tokens, prompt_len=len(p))
            for p, r in zip(prompts, rows, strict=True)
        ]

    def loss(self, ctx: StepContext, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        teacher = self.lm.teacher
        assert teacher is not None
        rows = self.student_rows(ctx, batch)
        signal = teacher.signal(batch, rows.select)
        # cross-entropy on the student's own samples would reinforce them: only on the dataset's text
        on_policy = getattr(batch, "on_policy", False)
        loss, parts = self.logit_loss(ctx, rows, signal, ce_weight=0.0 if on_policy else None)
        if self.replay is not None:
            units = float(batch.num_loss_tokens)
            if not on_policy:  # the dataset's batches: a fixed distribution, the schedule's signal
                self.replay.record(float(loss.detach()) * ctx.normalizer, units)
            parts.update(self.replay.parts(units / ctx.normalizer))
        return loss, parts

    def after_step(self, phase: Phase, step: int) -> None:
        if self.replay is not None:
            self.replay.end_step()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rng": self.rng.get_state()}
        if self.replay is not None:
            state["replay"] = self.replay.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" in state:
            self.rng.set_state(state["rng"])
        if self.replay is not None and "replay" in state:
            self.replay.load_state_dict(state["replay"])


def _as_batch(rows: list[TokenizedExample], pad_id: int, replayed: bool = False) -> SampledBatch:
    plain = collate(rows, [[i] for i in range(len(rows))], pad_id, packing=False)
    generated = 0 if replayed else sum(len(r.input_ids) - r.prompt_len for r in rows)
    return SampledBatch(**vars(plain), generated=generated, on_policy=True, replayed=replayed)


@METHODS.register("drafter")
class DrafterKD(OnPolicyKD):
    """DistillSpec: an on-policy drafter; `selective` drops a fraction of the tokens from the loss, ranked
    by AdaSPEC's loss gap to a frozen `reference` drafter, or without one by the drafter's own divergence."""

    name = "drafter"

    def __init__(self, cfg: DrafterConfig, ctx: LMContext) -> None:
        super().__init__(cfg, ctx)
        self.reference = load_reference(cfg.reference, ctx) if cfg.reference is not None else None

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        extra = {"reference": self.reference} if self.reference is not None else {}
        return {**super().frozen_modules(), **extra}

    def loss(self, ctx: StepContext, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        assert isinstance(cfg, DrafterConfig)
        if cfg.selective == 0:
            return super().loss(ctx, batch)
        teacher = self.lm.teacher
        assert teacher is not None
        rows = self.student_rows(ctx, batch)
        signal = teacher.signal(batch, rows.select)
        keep, kept_signal = self._select_tokens(rows, signal, cfg.selective, batch)
        kept_rows = StudentRows(rows.hidden[keep], rows.weight, rows.targets[keep], rows.select)
        loss, parts = self.logit_loss(ctx, kept_rows, kept_signal, ce_weight=0.0)
        parts["kept_fraction"] = float(len(keep)) / max(rows.hidden.shape[0], 1)
        return loss, parts

    @torch.no_grad()
    def _select_tokens(
        self, rows: StudentRows, signal: AnySignal, drop: float, batch: Batch
    ) -> tuple[torch.Tensor, AnySignal]:
        """The tokens kept, in order, and the teacher's signal at just those. Each token's rank: with a
        reference, L_reference - L_drafter (the `drop` fraction with the smallest gap goes); without one,
        L_drafter (the `drop` fraction with the largest loss goes)."""
        n = rows.hidden.shape[0]
        scores = torch.empty(n, device=rows.hidden.device)
        ref_hidden = ref_weight = None
        if self.reference is not None:
            ref_hidden = batch_hidden(self.reference, batch)[rows.select]
            head = self.reference.get_output_embeddings()
            assert head is not None  # checked when loaded
            ref_weight = head.weight[: self.lm.vocab_size]
        dense = []
        step = self.lm.chunk_size
        for s in range(0, n, step):
            student = (rows.hidden[s : s + step].detach() @ rows.weight.detach().T).float()
            teacher = _dense_rows(signal, s, min(s + step, n), student.shape[-1]).to(student.device)
            scores[s : s + step] = divergence_per_token(student, teacher, self.spec)
            if ref_hidden is not None and ref_weight is not None:
                reference = (ref_hidden[s : s + step] @ ref_weight.T).float().to(student.device)
                scores[s : s + step] = (
                    divergence_per_token(reference, teacher, self.spec) - scores[s : s + step]
                )
            if isinstance(signal, TeacherSignal):
                dense.append(teacher)
        keep = scores.argsort(stable=True)[: max(n - int(drop * n), 1)].sort().values
        if isinstance(signal, SparseTeacherSignal):
            k = keep.to(signal.ids.device)
            return keep, SparseTeacherSignal(
                signal.ids[k], signal.logprobs[k], signal.temperature, signal.vocab_size
            )
        kept = torch.cat(dense)[keep] if dense else torch.zeros(0, signal.vocab_size)

        def logits(start: int, end: int) -> torch.Tensor:
            return kept[start:end].clone()

        return keep, TeacherSignal(
            logits=logits, num_rows=len(keep), vocab_size=signal.vocab_size, fresh=True
        )


def load_reference(source: ModelConfig, ctx: LMContext) -> PreTrainedModel:
    """AdaSPEC's reference drafter, frozen; it must read the target's tokens (its tokenizer is compared
    with the run's, which the student shares with the target)."""
    from distill.models.loading import load_model, tokenizer_fingerprint

    try:
        loaded = load_model(source)
    except InputError as err:
        raise InputError(f"reference: {err}") from None
    if ctx.tokenizer is not None and tokenizer_fingerprint(loaded.tokenizer) != tokenizer_fingerprint(
        ctx.tokenizer
    ):
        raise CompatibilityError(
            "reference: its tokenizer differs from the target's (vocabulary content mismatch); use a "
            "drafter distilled from this target"
        )
    head = loaded.model.get_output_embeddings()
    if head is None or int(head.weight.shape[0]) < ctx.vocab_size:
        raise CompatibilityError(
            f"reference: its LM head is smaller than the target's vocabulary ({ctx.vocab_size} tokens)"
        )
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _dense_rows(signal: AnySignal, start: int, end: int, vocab: int) -> torch.Tensor:
    if isinstance(signal, TeacherSignal):
        return signal.logits(start, end)
    # top-k log-probs with the tail spread evenly: enough to rank tokens by divergence
    ids, lps = signal.ids[start:end], signal.logprobs[start:end].float()
    tail = (1 - lps.exp().sum(-1, keepdim=True)).clamp_min(1e-12) / max(vocab - ids.shape[1], 1)
    out = tail.log().expand(-1, vocab).clone()
    return out.scatter_(-1, ids, lps)
