"""Methods that learn on the student's own samples: `on_policy` (GKD), `drafter` (DistillSpec, with
AdaSPEC-style token selection) and `minillm` (reverse-KL policy gradient).

Sampling happens in `prepare`, without gradients, through the project's generation engine; the batch's
rows are rewritten as prompt + the student's completion, and the loss units become the generated tokens.
A coin (a generator whose state is checkpointed, so a resumed run flips the same coins) decides per batch
whether the student samples (probability `lmbda`) or the dataset's completions are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distill.configs.on_policy import DrafterConfig, MiniLLMConfig, OnPolicyConfig
from distill.data.batching import IGNORE, Batch, collate
from distill.data.tokenize import TokenizedExample
from distill.errors import CompatibilityError
from distill.generation.engine import Mixer, generate_tokens
from distill.generation.sampling import SamplingSpec
from distill.losses.tokens import divergence_per_token
from distill.methods.base import METHODS, Phase, StepContext
from distill.methods.lm.base import LMContext, StudentRows
from distill.methods.lm.logit_kd import LogitKD
from distill.teachers.base import AnySignal, SparseTeacherSignal, TeacherSignal
from distill.teachers.live import LiveTeacherSource


@dataclass
class SampledBatch(Batch):
    """A batch whose completions the student wrote (`generated` tokens) or the dataset's (0)."""

    generated: int = 0
    on_policy: bool = False

    def stats(self) -> dict[str, float]:
        return {
            **super().stats(),
            "generated_tokens": self.generated,
            "on_policy_batches": int(self.on_policy),
        }

    def to(self, device: torch.device) -> SampledBatch:
        return self if self.input_ids.device == device else _with(self, device)


def _with(b: SampledBatch, device: torch.device) -> SampledBatch:
    moved = Batch.to(b, device)
    return SampledBatch(**vars(moved), generated=b.generated, on_policy=b.on_policy)


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

    @property
    def lmbda(self) -> float:
        return float(getattr(self.cfg, "lmbda", 1.0))

    def prepare(self, batch: Any, phase: Phase) -> Any:
        coin = float(torch.rand((), generator=self.rng))
        if coin >= self.lmbda:
            return batch
        return self.sample_batch(batch)

    @torch.no_grad()
    def sample_batch(self, batch: Batch) -> SampledBatch:
        """The batch's prompts completed by the student (or the teacher/student mixture)."""
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
        examples = [
            TokenizedExample(input_ids=p + r.tokens, prompt_len=len(p))
            for p, r in zip(prompts, rows, strict=True)
        ]
        plain = collate(examples, [[i] for i in range(len(examples))], self.pad_id, packing=False)
        out = SampledBatch(**vars(plain), generated=sum(len(r.tokens) for r in rows), on_policy=True)
        return out.to(batch.input_ids.device)

    def loss(self, ctx: StepContext, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        teacher = self.lm.teacher
        assert teacher is not None
        rows = self.student_rows(ctx, batch)
        signal = teacher.signal(batch, rows.select)
        # cross-entropy on the student's own samples would reinforce them: only on the dataset's text
        ce = 0.0 if getattr(batch, "on_policy", False) else None
        return self.logit_loss(ctx, rows, signal, ce_weight=ce)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" in state:
            self.rng.set_state(state["rng"])


@METHODS.register("drafter")
class DrafterKD(OnPolicyKD):
    """DistillSpec: an on-policy drafter; `selective` drops the hardest tokens from the loss."""

    name = "drafter"

    def loss(self, ctx: StepContext, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        assert isinstance(cfg, DrafterConfig)
        if cfg.selective == 0:
            return super().loss(ctx, batch)
        teacher = self.lm.teacher
        assert teacher is not None
        rows = self.student_rows(ctx, batch)
        signal = teacher.signal(batch, rows.select)
        keep, kept_signal = self._easiest(rows, signal, cfg.selective)
        kept_rows = StudentRows(rows.hidden[keep], rows.weight, rows.targets[keep], rows.select)
        loss, parts = self.logit_loss(ctx, kept_rows, kept_signal, ce_weight=0.0)
        parts["kept_fraction"] = float(len(keep)) / max(rows.hidden.shape[0], 1)
        return loss, parts

    @torch.no_grad()
    def _easiest(self, rows: StudentRows, signal: AnySignal, drop: float) -> tuple[torch.Tensor, AnySignal]:
        """The tokens kept (all but the `drop` fraction with the largest divergence), and the teacher's
        signal at just those tokens."""
        n = rows.hidden.shape[0]
        scores = torch.empty(n, device=rows.hidden.device)
        dense = []
        step = self.lm.chunk_size
        for s in range(0, n, step):
            student = (rows.hidden[s : s + step].detach() @ rows.weight.detach().T).float()
            teacher = _dense_rows(signal, s, min(s + step, n), student.shape[-1]).to(student.device)
            scores[s : s + step] = divergence_per_token(student, teacher, self.spec)
            if isinstance(signal, TeacherSignal):
                dense.append(teacher)
        keep = scores.argsort()[: max(n - int(drop * n), 1)].sort().values
        if isinstance(signal, SparseTeacherSignal):
            k = keep.to(signal.ids.device)
            return keep, SparseTeacherSignal(
                signal.ids[k], signal.logprobs[k], signal.temperature, signal.vocab_size
            )
        kept = torch.cat(dense)[keep]

        def logits(start: int, end: int) -> torch.Tensor:
            return kept[start:end].clone()

        return keep, TeacherSignal(
            logits=logits, num_rows=len(keep), vocab_size=signal.vocab_size, fresh=True
        )


def _dense_rows(signal: AnySignal, start: int, end: int, vocab: int) -> torch.Tensor:
    if isinstance(signal, TeacherSignal):
        return signal.logits(start, end)
    # top-k log-probs with the tail spread evenly: enough to rank tokens by divergence
    ids, lps = signal.ids[start:end], signal.logprobs[start:end].float()
    tail = (1 - lps.exp().sum(-1, keepdim=True)).clamp_min(1e-12) / max(vocab - ids.shape[1], 1)
    out = tail.log().expand(-1, vocab).clone()
    return out.scatter_(-1, ids, lps)
