"""Feature and embedding losses for distillation (pure functions, plus one small memory-bank module).

Student features are expected already projected to the teacher's shape where a loss compares them
element-wise (FitNets, CRD, ND); attention transfer compares spatial maps and does not need equal
channel counts. Arithmetic runs in float32 at least (float64 stays float64). Nothing here detaches the
teacher: pass teacher tensors without grad. Norms are computed as ``sqrt(clamp_min(sum x**2, eps**2))``
so that zero vectors and duplicate embeddings give finite (zero) gradients instead of NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.classifier_logits import as_float as _as_float

__all__ = [
    "MemoryBank",
    "attention_map",
    "attention_transfer_loss",
    "crd_loss",
    "fitnet_loss",
    "nd_loss",
    "ofa_loss",
    "pkt_loss",
    "rkd_loss",
]


def _safe_norm(x: Tensor, eps: float = 1e-12) -> Tensor:
    """L2 norm over the last dim, at least ``eps``; zero gradient (not NaN) where the norm is below it."""
    return (x * x).sum(dim=-1).clamp_min(eps * eps).sqrt()


def _l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    return x / _safe_norm(x, eps).unsqueeze(-1)


def _flat_pair(s: Tensor, t: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Both as ``(B, D)``; the same ``B`` is required (``D`` is checked by the caller if needed)."""
    if s.dim() < 2 or t.dim() < 2 or s.shape[0] != t.shape[0]:
        raise ValueError(
            f"{name}: expected (B, ...) tensors with the same B, got {tuple(s.shape)}, {tuple(t.shape)}"
        )
    return _as_float(s).flatten(1), _as_float(t).flatten(1)


def fitnet_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Per-sample sum of squared errors over all feature elements, shape ``(B,)``.

    FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"): regress the (projected) student
    feature onto the teacher's. A *sum* over elements, so its scale grows with the feature size; the
    caller may divide by the element count to get the usual MSE.
    """
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(f"fitnet: shapes differ: {tuple(student_feat.shape)} vs {tuple(teacher_feat.shape)}")
    diff = _as_float(student_feat) - _as_float(teacher_feat)
    return (diff * diff).flatten(1).sum(dim=1)


def _attention_energy(feat: Tensor, p: float) -> Tensor:
    """Mean over channels of ``|f|**p``: ``(B, H, W)`` for ``(B, C, H, W)``, ``(B, N)`` for ``(B, N, D)``."""
    x = _as_float(feat)
    if x.dim() == 4:
        return x.abs().pow(p).mean(dim=1)
    if x.dim() == 3:
        return x.abs().pow(p).mean(dim=2)
    raise ValueError(f"attention: expected (B, C, H, W) or (B, N, D) features, got {tuple(feat.shape)}")


def attention_map(feat: Tensor, p: float = 2) -> Tensor:
    """Spatial attention ``(B, HW)``: mean over channels of ``|f|**p``, flattened, L2-normalised.

    Zagoruyko & Komodakis 2017, "Paying More Attention to Attention": *where* a network looks is
    transferable between architectures of different width. Token features ``(B, N, D)`` are treated as
    ``N`` spatial positions with ``D`` channels.
    """
    return _l2_normalize(_attention_energy(feat, p).flatten(1))


def attention_transfer_loss(s_feat: Tensor, t_feat: Tensor, p: float = 2) -> Tensor:
    """Per-sample squared L2 distance between the attention maps, shape ``(B,)``.

    Zagoruyko & Komodakis 2017 ("Paying More Attention to Attention"). Channel counts may differ. If
    the spatial sizes differ, the larger energy map (``mean_c |f|**p``, before normalisation) is
    adaptive-average-pooled to the smaller size, per axis (``(B, C, H, W)``: to ``min`` of each of H and
    W; ``(B, N, D)``: to ``min`` of N).
    """
    if s_feat.dim() != t_feat.dim() or s_feat.shape[0] != t_feat.shape[0]:
        raise ValueError(f"attention: incompatible features {tuple(s_feat.shape)} and {tuple(t_feat.shape)}")
    es, et = _attention_energy(s_feat, p), _attention_energy(t_feat, p)
    if es.shape != et.shape:
        # pooling to a map's own size is the identity, so only the larger one changes
        if es.dim() == 3:
            hw = (min(es.shape[1], et.shape[1]), min(es.shape[2], et.shape[2]))
            es = F.adaptive_avg_pool2d(es.unsqueeze(1), hw).squeeze(1)
            et = F.adaptive_avg_pool2d(et.unsqueeze(1), hw).squeeze(1)
        else:
            n = min(es.shape[1], et.shape[1])
            es = F.adaptive_avg_pool1d(es.unsqueeze(1), n).squeeze(1)
            et = F.adaptive_avg_pool1d(et.unsqueeze(1), n).squeeze(1)
    diff = _l2_normalize(es.flatten(1)) - _l2_normalize(et.flatten(1))
    return (diff * diff).sum(dim=1)


def _pairwise_distances(e: Tensor) -> Tensor:
    """``(B, B)`` Euclidean distances from explicit differences (no ``a^2 + b^2 - 2ab`` cancellation)."""
    return _safe_norm(e.unsqueeze(1) - e.unsqueeze(0))


def _triplet_cosines(e: Tensor) -> Tensor:
    """``cos[i, j, k]`` = cosine of the angle at ``j`` between ``e_i - e_j`` and ``e_k - e_j``."""
    unit = _l2_normalize(e.unsqueeze(0) - e.unsqueeze(1))  # unit[j, i] = normalised e_i - e_j
    return torch.einsum("jid,jkd->ijk", unit, unit)


def rkd_loss(
    s_emb: Tensor, t_emb: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> Tensor:
    """Relational KD, a scalar: ``distance_weight * L_dist + angle_weight * L_angle``.

    Park et al. 2019, "Relational Knowledge Distillation": transfer the *geometry* of the batch, not
    the embeddings themselves, so student and teacher dimensions may differ. Embeddings are flattened to
    ``(B, D)``. ``L_dist``: smooth-L1 between the pairwise-distance matrices, each divided by its mean
    off-diagonal distance (hence scale invariant), averaged over ordered pairs ``i != j``. ``L_angle``:
    smooth-L1 between ``cos`` of the angle at ``j`` of every triplet, averaged over ordered triplets with
    ``i != j`` and ``k != j``. (The paper's code averages over all ``B**2`` / ``B**3`` entries, zeros
    included: ours is that times ``B/(B-1)`` / ``(B/(B-1))**2``.) Needs ``B >= 2``.
    """
    s, t = _flat_pair(s_emb, t_emb, "rkd")
    b = s.shape[0]
    if b < 2:
        raise ValueError(f"rkd: needs a batch of at least 2 embeddings, got {b}")
    off = ~torch.eye(b, dtype=torch.bool, device=s.device)
    d_s, d_t = _pairwise_distances(s), _pairwise_distances(t)
    mean_s = d_s[off].mean().clamp_min(1e-12)
    mean_t = d_t[off].mean().clamp_min(1e-12)
    dist = F.smooth_l1_loss(d_s[off] / mean_s, d_t[off] / mean_t)
    valid = off.unsqueeze(2) & off.T.unsqueeze(0)  # valid[i, j, k]: i != j and k != j
    angle = F.smooth_l1_loss(_triplet_cosines(s)[valid], _triplet_cosines(t)[valid])
    return distance_weight * dist + angle_weight * angle


def pkt_loss(s_emb: Tensor, t_emb: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic KT, a scalar: mean over rows of ``KL(P_t[i] || P_s[i])``.

    Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer": match
    the distribution of similarities around each sample. Kernel: cosine similarity mapped to [0, 1] as
    ``(cos + 1) / 2``, plus ``eps`` so every entry is positive (antipodal pairs would otherwise give 0),
    rows (diagonal included) normalised to probabilities. With both sides proper distributions the value
    is a true KL, so ``>= 0``. Embeddings are flattened to ``(B, D)``; dimensions may differ.
    """
    s, t = _flat_pair(s_emb, t_emb, "pkt")

    def row_log_probs(e: Tensor) -> Tensor:
        u = _l2_normalize(e)
        k = ((u @ u.T).clamp(-1.0, 1.0) + 1.0) / 2.0 + eps
        return torch.log(k / k.sum(dim=1, keepdim=True))

    log_p, log_q = row_log_probs(t), row_log_probs(s)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def crd_loss(
    s_emb: Tensor, t_emb: Tensor, temperature: float = 0.07, negatives: Tensor | None = None
) -> Tensor:
    """Contrastive representation distillation as InfoNCE, a scalar (batch mean).

    Tian et al. 2020, "Contrastive Representation Distillation": a regression loss ignores correlations
    between dimensions; a contrastive one makes student sample ``i`` identify teacher sample ``i``
    among the other in-batch teacher embeddings and the optional extra ``negatives`` ``(K, D)`` (e.g.
    :class:`MemoryBank`). All embeddings are L2-normalised; logits are cosines divided by
    ``temperature``. One direction only (student -> teacher). Student and teacher must share ``D``.
    """
    s, t = _flat_pair(s_emb, t_emb, "crd")
    if s.shape[1] != t.shape[1]:
        raise ValueError(
            f"crd: embedding dims differ ({s.shape[1]} vs {t.shape[1]}); project the student first"
        )
    if not temperature > 0:
        raise ValueError(f"crd: temperature must be > 0, got {temperature!r}")
    s, t = _l2_normalize(s), _l2_normalize(t)
    logits = s @ t.T
    if negatives is not None and negatives.numel() > 0:
        neg = _l2_normalize(_as_float(negatives).to(s.dtype).flatten(1))
        logits = torch.cat([logits, s @ neg.T], dim=1)
    labels = torch.arange(s.shape[0], device=s.device)
    return F.cross_entropy(logits / temperature, labels)


class MemoryBank(nn.Module):
    """A bounded FIFO queue of teacher embeddings used as extra CRD negatives.

    The queue lives in buffers (``bank`` ``(size, dim)``, write position ``ptr``, fill ``count``), so it
    is part of ``state_dict()`` and a resumed run continues with exactly the same negatives. Stored
    embeddings are detached copies; :meth:`negatives` returns a fresh tensor, so a later :meth:`push`
    cannot modify a tensor that autograd saved for a pending backward.
    """

    bank: Tensor
    ptr: Tensor
    count: Tensor

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"MemoryBank: size and dim must be >= 1, got size={size}, dim={dim}")
        self.size, self.dim = int(size), int(dim)
        self.register_buffer("bank", torch.zeros(self.size, self.dim, dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def push(self, emb: Tensor) -> None:
        """Append ``(n, dim)`` embeddings (flattened from ``(n, ...)``), overwriting the oldest when full."""
        rows = emb.detach().flatten(1).to(device=self.bank.device, dtype=self.bank.dtype)
        if rows.shape[1] != self.dim:
            raise ValueError(f"MemoryBank.push: expected dim {self.dim}, got {tuple(emb.shape)}")
        rows = rows[-self.size :]  # only the newest `size` can survive
        n = rows.shape[0]
        idx = (int(self.ptr) + torch.arange(n, device=self.bank.device)) % self.size
        self.bank[idx] = rows
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.count.fill_(min(int(self.count) + n, self.size))

    def negatives(self) -> Tensor:
        """The stored embeddings, oldest first, as a new ``(len(self), dim)`` tensor."""
        n, p = int(self.count), int(self.ptr)
        if n < self.size:
            return self.bank[:n].clone()
        return torch.cat([self.bank[p:], self.bank[:p]])


def nd_loss(
    s_emb: Tensor,
    t_emb: Tensor,
    class_means: Tensor,
    target: Tensor,
    norm_weight: float = 1.0,
    direction_weight: float = 1.0,
) -> Tensor:
    """Norm-and-direction loss, per sample ``(B,)``.

    After Wang et al. 2023, "Improving Knowledge Distillation via Regularizing Feature Norm and
    Direction" (ND): align the student embedding with the teacher's class centre and keep its norm
    large. Exact definition used here, with ``c = class_means[target]`` (the teacher's per-class mean
    embeddings, ``(K, D)``):

        direction = 1 - cos(s, c)
        norm      = max(0, ||t|| - ||s||)          (hinge: no penalty once ||s|| >= ||t||)
        loss      = direction_weight * direction + norm_weight * norm

    Embeddings are flattened to ``(B, D)`` and must share ``D`` with the class means.
    """
    s, t = _flat_pair(s_emb, t_emb, "nd")
    c = _as_float(class_means).to(s.dtype)
    if c.dim() != 2 or c.shape[1] != s.shape[1]:
        raise ValueError(f"nd: class_means must be (K, {s.shape[1]}), got {tuple(class_means.shape)}")
    centre = c[target.long()]
    direction = 1.0 - (_l2_normalize(s) * _l2_normalize(centre)).sum(dim=1)
    norm = (_safe_norm(t) - _safe_norm(s)).clamp_min(0.0)
    return direction_weight * direction + norm_weight * norm


def ofa_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 1.0,
    eps_exponent: float = 1.0,
) -> Tensor:
    """OFA's adaptive target enhancement, per sample ``(B,)``.

    Hao et al. 2023, "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge
    Distillation": with ``p_t = softmax(t/T)``, ``log p_s = log_softmax(s/T)`` and ``y = target``,

        loss = -(1 + p_t[y]) ** eps_exponent * log p_s[y] - sum_{c != y} p_t[c] * log p_s[c]

    ``eps_exponent = 1`` is hard-label cross-entropy plus the soft cross-entropy with the teacher;
    a larger exponent strengthens the target class, more so where the teacher is confident.
    ``eps_exponent = 0`` is the soft cross-entropy with the teacher distribution whose target entry is
    replaced by 1. No ``T**2`` factor. (The authors' code instead weights the target by
    ``(1 + p_t[y]) ** eps - 1`` and the others by ``p_t[c] ** eps``, which equals plain KD at ``eps = 1``.)
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"ofa: expected (B, C) logits of equal shape, got {tuple(student_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"ofa: temperature must be > 0, got {temperature!r}")
    log_ps = torch.log_softmax(_as_float(student_logits) / temperature, dim=-1)
    p_t = torch.softmax(_as_float(teacher_logits) / temperature, dim=-1)
    y = target.long().unsqueeze(1)
    p_t_target = p_t.gather(1, y)
    weights = p_t.scatter(1, y, (1.0 + p_t_target).pow(eps_exponent))
    return -(weights * log_ps).sum(dim=-1)
