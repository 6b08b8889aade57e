"""Distillation losses: student logits vs. an ensemble target distribution.

Every loss takes ``(student_logits [B, C], target_probs [B, C], labels [B])`` where
``target_probs`` is the ensemble's distribution already softened at temperature T (rows
sum to 1), and returns a scalar mean over the batch. The student is softened the same
way, ``p_s = softmax(student_logits / T)``, and every soft term is multiplied by T^2
(Hinton et al. 2015) so its gradient scale does not shrink as T grows.

Losses are computed in at least float32, so bf16/fp16 student logits do not underflow
the small probabilities.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("kd", "forward_kl", "reverse_kl", "jsd")

# A zero target probability is read as this floor inside a log: KL terms weighted by
# that zero stay exactly 0, and a student putting mass there (reverse KL) pays a large
# (log 1e-12 ~ -27.6) but finite price, so the loss and its gradients never go inf/NaN.
PROB_FLOOR = 1e-12


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def safe_log(probs: torch.Tensor) -> torch.Tensor:
    """log(p) with p clamped to ``PROB_FLOOR``, so zeros give a finite value."""
    return probs.clamp_min(PROB_FLOOR).log()


def kl_div(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_c p (log p - log q) per row: [B, C] -> [B].

    Callers pass finite logs (``safe_log`` / ``log_softmax``), so p = 0 entries add
    exactly 0 and their gradients stay finite.
    """
    return (p * (log_p - log_q)).sum(dim=-1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 -> fp32, fp64 stays


def _soften(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float):
    """Upcast and soften: returns (p_s, log p_s, p_t, log p_t), each [B, C]."""
    if student_logits.shape != target_probs.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and target_probs "
            f"{tuple(target_probs.shape)} must both be [batch, classes]"
        )
    dtype = _compute_dtype(student_logits)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    p_t = target_probs.to(dtype)
    return log_p_s.exp(), log_p_s, p_t, safe_log(p_t)


class ForwardKL(nn.Module):
    """T^2 * KL(p_t || p_s): mean-seeking, the classic soft-target term.

    Shapes: student_logits [B, C], target_probs [B, C], labels [B] (unused) -> scalar.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature

    def forward(self, student_logits, target_probs, labels=None):
        _, log_p_s, p_t, log_p_t = _soften(student_logits, target_probs, self.temperature)
        return self.temperature**2 * kl_div(p_t, log_p_t, log_p_s).mean()


class ReverseKL(nn.Module):
    """T^2 * KL(p_s || p_t): mode-seeking, the student concentrates on target modes.

    Shapes: student_logits [B, C], target_probs [B, C], labels [B] (unused) -> scalar.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature

    def forward(self, student_logits, target_probs, labels=None):
        p_s, log_p_s, _, log_p_t = _soften(student_logits, target_probs, self.temperature)
        return self.temperature**2 * kl_div(p_s, log_p_s, log_p_t).mean()


class JSD(nn.Module):
    """T^2 * [beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)], m = beta p_t + (1 - beta) p_s.

    Generalised Jensen-Shannon divergence; bounded, and symmetric in the two roles at
    beta = 0.5. Shapes: student_logits [B, C], target_probs [B, C], labels [B] (unused)
    -> scalar.
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0):
        super().__init__()
        _check_unit("beta", beta)
        _check_temperature(temperature)
        self.beta = beta
        self.temperature = temperature

    def forward(self, student_logits, target_probs, labels=None):
        p_s, log_p_s, p_t, log_p_t = _soften(student_logits, target_probs, self.temperature)
        b = self.beta
        log_m = safe_log(b * p_t + (1.0 - b) * p_s)
        jsd = b * kl_div(p_t, log_p_t, log_m) + (1.0 - b) * kl_div(p_s, log_p_s, log_m)
        return self.temperature**2 * jsd.mean()


class KDLoss(nn.Module):
    """alpha * CE(student at T=1, labels) + (1 - alpha) * T^2 * KL(p_t || p_s).

    Hinton-style distillation mixing the hard-label loss with the soft-target term.
    Shapes: student_logits [B, C], target_probs [B, C], labels [B] long -> scalar.
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 1.0):
        super().__init__()
        _check_unit("alpha", alpha)
        self.alpha = alpha
        self.soft = ForwardKL(temperature)

    def forward(self, student_logits, target_probs, labels):
        hard = F.cross_entropy(student_logits.to(_compute_dtype(student_logits)), labels)
        return self.alpha * hard + (1.0 - self.alpha) * self.soft(student_logits, target_probs)


def build_loss(name: str, *, alpha: float = 0.5, beta: float = 0.5, temperature: float = 1.0) -> nn.Module:
    """Loss module by name (one of ``LOSSES``); alpha is used by "kd", beta by "jsd"."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; use one of {', '.join(LOSSES)}")
    _check_unit("alpha", alpha)
    _check_unit("beta", beta)
    _check_temperature(temperature)
    if name == "kd":
        return KDLoss(alpha=alpha, temperature=temperature)
    if name == "forward_kl":
        return ForwardKL(temperature=temperature)
    if name == "reverse_kl":
        return ReverseKL(temperature=temperature)
    return JSD(beta=beta, temperature=temperature)
