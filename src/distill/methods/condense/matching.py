"""Learned synthetic sets that match statistics of the real data through a network: distribution matching
(mean embeddings, DM), attention matching (DataDAM) and gradient matching (DC), each with differentiable
siamese augmentation (one draw of augmentation parameters applied to the real and the synthetic batch of
a class). The network and the augmentation are drawn in the no-grad preparation step from the global RNG,
which the engine checkpoints, so a resumed run draws the same ones."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distill.classifier.hooks import FeatureTaps
from distill.condense.dsa import DSAParams, apply_dsa
from distill.condense.matching import (
    attention_matching_loss,
    class_gradients,
    distribution_matching_loss,
    final_embedding_mmd,
    gradient_distance,
)
from distill.configs.condense import AttentionMatchConfig, DistributionMatchConfig, GradientMatchConfig
from distill.methods.base import METHODS, Phase, StepContext
from distill.methods.condense.base import CondenseContext, CondenseMethod, RealBatch


def embed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the model's `head` (its penultimate features), or its output when it has none."""
    head = getattr(model, "head", None)
    if head is None:
        return model(x)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inp, _o: captured.append(inp[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[0].flatten(1)


class _Matching(CondenseMethod):
    """Per class: real rows and the synthetic rows of that class, augmented with one shared draw."""

    def prepare(self, batch: RealBatch, phase: Phase) -> RealBatch:
        seed = int(torch.randint(0, 2**62, (1,)))
        batch.extra["seed"] = seed
        batch.extra["network"] = self.ctx.make_network(seed % (2**31)).train()
        return batch

    def _augment(
        self, real: torch.Tensor, syn: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cfg.dsa or real.dim() != 4:
            return real, syn
        params = DSAParams.sample(
            self.cfg.dsa_strategy, 1, (real.shape[2], real.shape[3]), gen, batch_shared=True
        )
        return apply_dsa(real, params), apply_dsa(syn, params)

    def per_class(self, ctx: StepContext, batch: RealBatch) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        images = ctx.modules["images"]()
        gen = torch.Generator().manual_seed(batch.extra["seed"])
        out = []
        ipc = self.ctx.ipc
        for c in range(self.ctx.classes):
            real = batch.x[batch.y == c]
            syn = images[c * ipc : (c + 1) * ipc]
            r, s = self._augment(real, syn, gen)
            out.append((r, s, c))
        return out


@METHODS.register("dm")
class DistributionMatching(_Matching):
    name = "dm"
    cfg: DistributionMatchConfig

    def loss(self, ctx: StepContext, batch: RealBatch) -> tuple[torch.Tensor, dict[str, float]]:
        net = batch.extra["network"].requires_grad_(False)
        total = ctx.modules["images"]().sum() * 0.0
        for real, syn, _ in self.per_class(ctx, batch):
            with torch.no_grad():
                emb_real = embed(net, real)
            total = total + distribution_matching_loss(emb_real, embed(net, syn))
        return total / ctx.normalizer, {"dm": float(total.detach()) / ctx.normalizer}


@METHODS.register("datadam")
class AttentionMatching(_Matching):
    name = "datadam"
    cfg: AttentionMatchConfig

    def loss(self, ctx: StepContext, batch: RealBatch) -> tuple[torch.Tensor, dict[str, float]]:
        net = batch.extra["network"].requires_grad_(False)
        taps = FeatureTaps(net, self.cfg.layers, "network")
        total = ctx.modules["images"]().sum() * 0.0
        attention = 0.0
        try:
            for real, syn, _ in self.per_class(ctx, batch):
                with torch.no_grad():
                    emb_real = embed(net, real)
                    real_maps = [taps.take(p) for p in self.cfg.layers]
                emb_syn = embed(net, syn)
                syn_maps = [taps.take(p) for p in self.cfg.layers]
                sam = attention_matching_loss(real_maps, syn_maps)
                attention += float(sam.detach())
                total = total + sam + self.cfg.embedding_weight * final_embedding_mmd(emb_real, emb_syn)
        finally:
            taps.remove()
        n = ctx.normalizer
        return total / n, {"datadam": float(total.detach()) / n, "attention": attention / n}


@METHODS.register("dc")
class GradientMatching(_Matching):
    """The network persists across steps and learns on the synthetic set in the after-step hook
    (`inner_steps` SGD updates after each synthetic update); it is re-initialised every `reset_every`
    steps (the paper's outer loop). Its state is checkpointed with the method."""

    name = "dc"
    cfg: GradientMatchConfig
    reset_every = 10

    def __init__(self, ctx: CondenseContext, cfg: GradientMatchConfig) -> None:
        super().__init__(ctx, cfg)
        self.net = ctx.make_network(0)
        self.steps_done = 0

    def prepare(self, batch: RealBatch, phase: Phase) -> RealBatch:
        batch.extra["seed"] = int(torch.randint(0, 2**62, (1,)))
        if self.steps_done % self.reset_every == 0:
            self.net = self.ctx.make_network(batch.extra["seed"] % (2**31))
        return batch

    def loss(self, ctx: StepContext, batch: RealBatch) -> tuple[torch.Tensor, dict[str, float]]:
        net = self.net.to(batch.x.device).train()
        total = ctx.modules["images"]().sum() * 0.0
        for real, syn, c in self.per_class(ctx, batch):
            y_real = torch.full((len(real),), c, device=real.device)
            y_syn = torch.full((len(syn),), c, device=syn.device)
            g_real = [g.detach() for g in class_gradients(net, None, real, y_real, F.cross_entropy)]
            g_syn = class_gradients(net, None, syn, y_syn, F.cross_entropy, create_graph=True)
            total = total + gradient_distance(g_real, g_syn)
        return total / ctx.normalizer, {"dc": float(total.detach()) / ctx.normalizer}

    def after_step(self, phase: Phase, step: int) -> None:
        """The network learns on the (now updated) synthetic set, as the paper's inner loop does."""
        self.steps_done += 1
        images, labels = self.images.images.detach(), self.ctx.labels.to(self.images.images.device)
        opt = torch.optim.SGD(self.net.parameters(), lr=self.cfg.inner_lr, momentum=0.5)
        for _ in range(self.cfg.inner_steps):
            opt.zero_grad()
            F.cross_entropy(self.net(images), labels).backward()
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
            "steps_done": self.steps_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.steps_done = int(state["steps_done"])
