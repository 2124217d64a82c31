"""DMD2 (Yin et al. 2024): the distribution-matching gradient of the shared score-distillation
machinery, plus its two optional terms.

- `regression` (DMD1's regulariser): LPIPS is not available here, so the generator's one-step output
  from a fixed noise is pulled by MSE toward the teacher's 16-step Euler/DDIM sample from the same
  noise. The pool (256 noises, their teacher samples and labels) is a pure function of a fixed seed,
  made once at first use and checkpointed with the method's state. For multi-step generators it still
  pairs the t = 1 step with the teacher's full ODE (the first jump of the chain).
- `gan_weight`: a non-saturating GAN on noisy samples. The paper puts the classifier on the fake
  network's bottleneck; the family's Denoisers expose no feature hook, and a shared trunk would couple
  the critic's denoising fit to the discriminator, so the head is a separate small MLP on the
  path-scaled noisy sample, its noise level and class, trained in the critic group on real data (the
  batch, noised) versus generator samples noised at the same level.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distill.classifier.batches import ClassifierBatch
from distill.configs.diffusion import DMD2Config
from distill.diffusion.models import sinusoidal, x0_of
from distill.diffusion.paths import NoisePath
from distill.diffusion.sampling import sample_chain
from distill.losses.diffusion import dmd_gradient, dmd_surrogate, gan_critic_loss, gan_generator_loss
from distill.methods.base import METHODS, Phase, StepContext
from distill.methods.diffusion.base import DiffusionContext
from distill.methods.diffusion.score_distill import Parts, ScoreDistill

POOL_SIZE = 256
POOL_STEPS = 16
POOL_SEED = 20_240_514


class NoisyDiscriminator(nn.Module):
    """Logit of "real" for a noisy sample x_t at level t (and class): an MLP on the path's network input."""

    def __init__(self, shape: tuple[int, ...], classes: int, path: NoisePath, hidden: int = 128) -> None:
        super().__init__()
        self.path, self.emb = path, 64
        dim = 1
        for s in shape:
            dim *= s
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Linear(self.emb, hidden)
        self.label = nn.Embedding(classes + 1, hidden) if classes > 0 else None
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        inp, time = self.path.net_input(x, t)
        h = self.inp(inp.flatten(1)) + self.time(sinusoidal(time, self.emb))
        if self.label is not None and labels is not None:
            h = h + self.label(labels)
        out: torch.Tensor = self.body(h).squeeze(-1)
        return out


@METHODS.register("dmd2")
class DMD2(ScoreDistill):
    name = "dmd2"

    def __init__(self, ctx: DiffusionContext, cfg: DMD2Config) -> None:
        super().__init__(ctx, cfg)
        self.regression, self.gan_weight = cfg.regression, cfg.gan_weight
        self.head: NoisyDiscriminator | None = None
        if self.gan_weight > 0:
            self.head = NoisyDiscriminator(ctx.shape, ctx.classes, ctx.path)
        self.pool: dict[str, torch.Tensor] | None = None

    def modules(self) -> dict[str, torch.nn.Module]:
        return {**super().modules(), **({"head": self.head} if self.head is not None else {})}

    def groups(self) -> dict[str, list[str]]:
        critic = ["fake", "head"] if self.head is not None else ["fake"]
        return {"generator": ["student"], "critic": critic}

    # -------------------------------------------------------------- regression pool

    @torch.no_grad()
    def regression_pool(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Fixed noises and the teacher's ODE samples from them (made once, checkpointed)."""
        if self.pool is None:
            g = torch.Generator().manual_seed(POOL_SEED)
            noise = self.path.prior((POOL_SIZE, *self.ctx.shape), g).to(device)
            pool = {"noise": noise}
            labels = None
            if self.ctx.classes > 0:
                labels = torch.randint(0, self.ctx.classes, (POOL_SIZE,), generator=g).to(device)
                pool["labels"] = labels
            pool["target"] = sample_chain(
                lambda x, t: self.teacher_x0(x, t, labels), self.path, noise, POOL_STEPS, "ode"
            )
            self.pool = pool
        return {k: v.to(device) for k, v in self.pool.items()}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.pool is not None:
            state["regression"] = dict(self.pool)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "regression" in state:
            self.pool = dict(state["regression"])

    # -------------------------------------------------------------- preparation and losses

    def prepare_more(self, batch: ClassifierBatch, phase: Phase) -> None:
        e, x = batch.extra, batch.x
        if phase.group == "critic" and self.head is not None:
            e["real_t"] = self.path.noisy(x, torch.randn_like(x), e["t"])
        if phase.group == "generator" and self.regression > 0:
            pool = self.regression_pool(x.device)
            rows = torch.randint(0, POOL_SIZE, (x.shape[0],), device=x.device)
            e["reg_noise"], e["reg_target"] = pool["noise"][rows], pool["target"][rows]
            if "labels" in pool:
                e["reg_labels"] = pool["labels"][rows]

    def critic_loss(self, ctx: StepContext, batch: ClassifierBatch) -> tuple[torch.Tensor, Parts]:
        per_row, parts = super().critic_loss(ctx, batch)
        if self.head is not None:
            e, labels, head = batch.extra, self.labels(batch), ctx.modules["head"]
            gan = gan_critic_loss(head(e["real_t"], e["t"], labels), head(e["xt"], e["t"], labels))
            per_row = per_row + gan
            parts["gan_d"] = float(gan.detach().mean())
        return per_row, parts

    def loss(self, ctx: StepContext, batch: ClassifierBatch) -> tuple[torch.Tensor, Parts]:
        if ctx.phase.group == "critic" or self.regression == 0:
            return super().loss(ctx, batch)
        # One generator call for the batch and its regression rows (a DDP module runs once per backward).
        e, labels, n = batch.extra, self.labels(batch), batch.x.shape[0]
        x_in = torch.cat([e["x_in"], e["reg_noise"]])
        t_in = torch.cat([e["t_in"], torch.ones(n, device=x_in.device)])
        both = None if labels is None else torch.cat([labels, e["reg_labels"]])
        out = x0_of(ctx.modules["student"], self.path, x_in, t_in, both)
        per_row, parts = self.generator_loss(ctx, batch, out[:n])
        reg = (out[n:] - e["reg_target"]).pow(2).flatten(1).mean(1)
        parts["regression"] = float(reg.detach().mean())
        return (per_row + self.regression * reg).sum() / ctx.normalizer, parts

    def generator_loss(
        self, ctx: StepContext, batch: ClassifierBatch, x_g: torch.Tensor
    ) -> tuple[torch.Tensor, Parts]:
        """The DMD term and, with a head, the weighted non-saturating GAN term."""
        xt, real, fake = self.scores(x_g, batch)
        per_row = dmd_surrogate(x_g, real, fake)
        grad = dmd_gradient(x_g, real, fake).flatten(1)
        parts = {"dmd": float(per_row.detach().mean()), "dmd_grad": float(grad.norm(dim=1).mean())}
        if self.head is not None:
            gan = gan_generator_loss(self.head(xt, batch.extra["t"], self.labels(batch)))
            per_row = per_row + self.gan_weight * gan
            parts["gan_g"] = float(gan.detach().mean())
        return per_row, parts
