"""Feature- and relation-based distillation losses: extra weighted terms beside the response loss.

A separate module from ``orchestrator/losses.py`` (already ~390 lines of response losses over
logits); these take intermediate features instead. Pure torch, no Ray. Each loss returns a
scalar; ``build_extra_loss`` turns one ``train.extra_losses`` entry into a module.

Features are pooled ``[B, D]`` (one vector per sample) or token-level ``[B, L, D]`` with an
optional ``mask [B, L]`` (1 = a real token, 0 = padding). Student and teacher widths may differ:
only the hint loss compares feature vectors directly, through a learned projection (which trains
with the student and is dropped at export); the others compare width-free quantities (attention
maps, distances, angles, Gram matrices).

Losses are computed in at least float32: teacher features are stored as float16.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import check_extra_loss

# Norms below this are treated as this (a zero vector normalises to zero, not NaN), and squared
# distances are clamped to it before sqrt so the gradient at coincident points stays finite.
EPS = 1e-12


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _masked_mean(per_item: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``per_item [B]`` or ``[B, L]`` over the positions ``mask`` keeps (all if None)."""
    if mask is None:
        return per_item.mean()
    if mask.shape != per_item.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must be [batch, length] = {tuple(per_item.shape)}")
    m = mask.to(per_item.dtype)
    return (per_item * m).sum() / m.sum().clamp_min(1.0)


def _zero_masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x [B, L, ...]`` with the positions ``mask [B, L]`` drops set to 0."""
    if mask is None:
        return x
    if x.dim() < 2 or mask.shape != x.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} must be [batch, length] of features {tuple(x.shape)}")
    return x * mask.to(x.dtype).reshape(*mask.shape, *([1] * (x.dim() - 2)))


class HintLoss(nn.Module):
    """FitNets hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015): a learned
    regressor maps the student's (thinner) feature to the teacher's width, then a distance.

    distance ``mse``: mean over the teacher width of (W s + b - t)^2; ``cosine``: 1 - cos(W s + b, t).
    Shapes: student [B, Ds] or [B, L, Ds], teacher [B, Dt] or [B, L, Dt], mask [B, L] (token level
    only) -> scalar, the mean over samples (or over the positions the mask keeps).
    """

    def __init__(self, student_dim: int, teacher_dim: int, distance: str = "mse"):
        super().__init__()
        if distance not in ("mse", "cosine"):
            raise ValueError(f"distance must be mse or cosine, got {distance!r}")
        self.distance = distance
        self.proj = nn.Linear(student_dim, teacher_dim)  # the FitNets regressor

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if student.dim() not in (2, 3) or student.shape[:-1] != teacher.shape[:-1]:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features must be "
                             "[batch, dim] or [batch, length, dim] with the same leading sizes")
        s = self.proj(_f32(student).to(self.proj.weight.dtype))
        t = _f32(teacher).to(s.dtype)
        if self.distance == "mse":
            per_item = (s - t).pow(2).mean(dim=-1)
        else:
            per_item = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=EPS)
        if mask is not None and student.dim() == 2:
            raise ValueError("mask applies to token-level [batch, length, dim] features only")
        return _masked_mean(per_item, mask)


class AttentionTransfer(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017):
    match the L2-normalised attention maps of student and teacher, distance ||q_s - q_t||_2 (p=2).

    source ``attention``: transformer attention probabilities [B, H, L, L]; the heads are averaged
    (student and teacher may have different head counts), giving a map of L*L entries per sample.
    source ``activation``: token activations [B, L, D]; the map is sum_d |a_d|^2 per position (the
    paper's F^2 spatial attention, the token axis playing the spatial one), L entries per sample.
    A mask [B, L] zeroes padded positions (rows and columns of an attention map) before normalising.
    Shapes: student, teacher as above (same B and L, any H / D) -> scalar, the mean over samples.
    """

    def __init__(self, source: str = "attention"):
        super().__init__()
        if source not in ("attention", "activation"):
            raise ValueError(f"source must be attention or activation, got {source!r}")
        self.source = source

    def _map(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = _f32(x)
        if self.source == "attention":
            if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
                raise ValueError(f"attention maps must be [batch, heads, length, length], got {tuple(x.shape)}")
            q = x.mean(dim=1)  # [B, L, L]
            if mask is not None:
                q = _zero_masked(q, mask) * mask.to(q.dtype).unsqueeze(1)  # rows, then columns
        else:
            if x.dim() != 3:
                raise ValueError(f"activations must be [batch, length, dim], got {tuple(x.shape)}")
            q = _zero_masked(x, mask).pow(2).sum(dim=-1)  # [B, L]
        return F.normalize(q.flatten(1), p=2, dim=1, eps=EPS)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q_s, q_t = self._map(student, mask), self._map(teacher, mask)
        if q_s.shape != q_t.shape:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} maps differ in "
                             "batch or length")
        return (q_s - q_t).norm(p=2, dim=1).mean()


def _pooled(x: torch.Tensor, who: str) -> torch.Tensor:
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"{who} features must be pooled [batch >= 2, dim] (set pool: cls or mean), "
                         f"got {tuple(x.shape)}")
    return _f32(x)


def _pair_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [B, B] between the rows of x [B, D] (0 on the diagonal)."""
    diff = x.unsqueeze(0) - x.unsqueeze(1)
    return diff.pow(2).sum(-1).clamp_min(EPS).sqrt() * (1 - torch.eye(len(x), dtype=x.dtype, device=x.device))


class RKDDistance(nn.Module):
    """RKD distance-wise loss (Park et al., "Relational Knowledge Distillation", CVPR 2019):
    psi(i, j) = ||x_i - x_j|| / mu, mu the mean distance over pairs i != j (scale-free, so the
    widths and scales of student and teacher may differ); Huber (smooth L1, delta 1) between the
    student's and the teacher's psi, mean over the ordered pairs i != j.
    Shapes: student [B, Ds], teacher [B, Dt] (B >= 2) -> scalar.
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = _pooled(student, "student"), _pooled(teacher, "teacher")
        if len(s) != len(t):
            raise ValueError(f"student batch {len(s)} != teacher batch {len(t)}")
        off = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
        d_s, d_t = _pair_distances(s)[off], _pair_distances(t.to(s.dtype))[off]
        psi_s = d_s / d_s.mean().clamp_min(EPS)
        psi_t = d_t / d_t.mean().clamp_min(EPS)
        return F.smooth_l1_loss(psi_s, psi_t, beta=1.0)


class RKDAngle(nn.Module):
    """RKD angle-wise loss (Park et al. 2019): for every triplet (i, j, k) of distinct samples,
    psi(i, j, k) = cos of the angle at x_j = <e_ij, e_kj>, e_ij = (x_i - x_j) / ||x_i - x_j||;
    Huber (smooth L1, delta 1) between student and teacher, mean over the B(B-1)(B-2) ordered triplets.
    Shapes: student [B, Ds], teacher [B, Dt] (B >= 3) -> scalar.
    """

    @staticmethod
    def _cosines(x: torch.Tensor) -> torch.Tensor:
        e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=-1, eps=EPS)  # e[j, i] = unit(x_i - x_j)
        return torch.einsum("jid,jkd->ijk", e, e)  # [i, j, k]: cos of the angle at j

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = _pooled(student, "student"), _pooled(teacher, "teacher")
        if len(s) != len(t) or len(s) < 3:
            raise ValueError(f"angles need the same batch of >= 3 samples (student {len(s)}, teacher {len(t)})")
        n = len(s)
        idx = torch.arange(n, device=s.device)
        i, j, k = idx.view(n, 1, 1), idx.view(1, n, 1), idx.view(1, 1, n)
        distinct = (i != j) & (j != k) & (i != k)
        return F.smooth_l1_loss(self._cosines(s)[distinct], self._cosines(t.to(s.dtype))[distinct], beta=1.0)


class SimilarityPreserving(nn.Module):
    """Similarity-preserving KD (Tung & Mori, "Similarity-Preserving Knowledge Distillation",
    ICCV 2019): G = F F^T over the batch, each row L2-normalised; loss ||G_s - G_t||_F^2 / B^2.
    Token-level features are flattened per sample (masked positions zeroed first), as the paper
    flattens activation maps. Shapes: student [B, Ds] or [B, L, Ds], teacher [B, Dt] or [B, L', Dt],
    mask [B, L] (token level, when L = L') -> scalar.
    """

    @staticmethod
    def _gram(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = _zero_masked(_f32(x), mask if x.dim() == 3 else None).flatten(1)
        return F.normalize(x @ x.T, p=2, dim=1, eps=EPS)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if len(student) != len(teacher):
            raise ValueError(f"student batch {len(student)} != teacher batch {len(teacher)}")
        g_s = self._gram(student, mask)
        g_t = self._gram(teacher, mask).to(g_s.dtype)
        return (g_s - g_t).pow(2).sum() / len(student) ** 2


class ExtraLoss(nn.Module):
    """One ``train.extra_losses`` term: ``weight * loss(student_feature, teacher_feature[, mask])``.

    Carries where its inputs come from (``teacher``, ``teacher_layer``, ``student_layer``) for the
    train loop; its parameters (the hint projection) train with the student and are not exported.
    """

    def __init__(self, spec: dict, loss: nn.Module):
        super().__init__()
        self.kind, self.weight = spec["kind"], float(spec["weight"])
        self.teacher, self.teacher_layer, self.student_layer = spec["teacher"], spec["teacher_layer"], spec["student_layer"]
        self.loss = loss

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self.loss, (RKDDistance, RKDAngle)):
            return self.weight * self.loss(student, teacher)
        return self.weight * self.loss(student, teacher, mask)


def build_extra_loss(spec: dict, student_dim: int | None = None, teacher_dim: int | None = None,
                     where: str = "train.extra_losses") -> ExtraLoss:
    """One ``train.extra_losses`` entry -> ExtraLoss; a bad entry raises DistillError naming the field.

    ``student_dim`` / ``teacher_dim`` are the feature widths; only ``hint`` needs them.
    """
    from .errors import DistillError

    spec = check_extra_loss(spec, where)
    kind = spec["kind"]
    if kind == "hint":
        for name, dim in (("student_layer", student_dim), ("teacher_layer", teacher_dim)):
            if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
                raise DistillError(f"{where}.{name}: hint needs the feature width of {spec[name]!r} "
                                   f"(got {dim!r}); check that the layer exists and is captured")
        loss: nn.Module = HintLoss(student_dim, teacher_dim, spec["distance"])
    elif kind == "attention":
        loss = AttentionTransfer(spec["source"])
    else:
        loss = {"rkd_distance": RKDDistance, "rkd_angle": RKDAngle, "similarity": SimilarityPreserving}[kind]()
    return ExtraLoss(spec, loss)
