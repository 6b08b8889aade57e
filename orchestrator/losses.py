"""Distillation losses: student logits vs. an ensemble target distribution.

Every loss takes ``(student_logits [B, C], target_probs [B, C], labels [B])`` where
``target_probs`` is the ensemble's distribution already softened at temperature T (rows
sum to 1), and returns a scalar mean over the batch. The student is softened the same
way, ``p_s = softmax(student_logits / T)``, and every soft term is multiplied by T^2
(Hinton et al. 2015) so its gradient scale does not shrink as T grows.

Losses are computed in at least float32, so bf16/fp16 student logits do not underflow
the small probabilities.

The ``TopK*`` losses take a sparse target instead (causal-LM teachers, see
``ensemble.ensemble_topk``): per token position the target's top-k ids + log-probs, the
unlisted mass kept as one tail bucket; they mask padding and prompt positions, and work
through the positions in chunks (``_ChunkedRows``) so that no float32 copy of the whole
[B, L, V] logits is made.

Over 300 lines: the dense and top-k families share their checks, kl_div and
``_build``, and reading them side by side shows they compute the same thing.
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
        soft = self.soft(student_logits, target_probs)
        self.last_soft = soft.detach()  # the distillation term alone, for metrics
        return self.alpha * hard + (1.0 - self.alpha) * soft


def _build(family: dict, name: str, alpha: float, beta: float, temperature: float) -> nn.Module:
    """Validate the settings once, for dense and top-k families alike, and build by name."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; use one of {', '.join(LOSSES)}")
    _check_unit("alpha", alpha)
    _check_unit("beta", beta)
    _check_temperature(temperature)
    extra = {"kd": {"alpha": alpha}, "jsd": {"beta": beta}}.get(name, {})
    return family[name](temperature=temperature, **extra)


def build_loss(name: str, *, alpha: float = 0.5, beta: float = 0.5, temperature: float = 1.0) -> nn.Module:
    """Loss module by name (one of ``LOSSES``); alpha is used by "kd", beta by "jsd"."""
    family = {"kd": KDLoss, "forward_kl": ForwardKL, "reverse_kl": ReverseKL, "jsd": JSD}
    return _build(family, name, alpha, beta, temperature)


# ---------------------------------------------------------------------------------------
# Sparse (top-k) targets: KL over the k listed tokens + one tail bucket.
# ---------------------------------------------------------------------------------------


def _check_topk_shapes(student_logits, target_ids, target_logprobs) -> None:
    if student_logits.dim() < 2 or target_ids.dim() < 2 \
            or student_logits.shape[:-1] != target_ids.shape[:-1] \
            or target_logprobs.shape != target_ids.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)}, target_ids {tuple(target_ids.shape)} and "
            f"target_logprobs {tuple(target_logprobs.shape)} must be [..., V], [..., k], [..., k] "
            f"with the same leading positions"
        )


def _topk_buckets(student_logits, target_ids, target_logprobs, temperature: float):
    """Flatten positions and build both sides' (k+1)-bucket distributions.

    Returns (logits [N, V] upcast, p_s, log p_s, p_t, log p_t), the last four [N, k+1] with
    the tail bucket last. Padded target slots (id < 0) are 0 on both sides.
    """
    _check_topk_shapes(student_logits, target_ids, target_logprobs)
    dtype = _compute_dtype(student_logits)
    logits = student_logits.reshape(-1, student_logits.shape[-1]).to(dtype)
    ids = target_ids.reshape(-1, target_ids.shape[-1]).long()
    listed = ids >= 0
    scaled = logits if temperature == 1.0 else logits / temperature  # x / 1 == x: skip an [N, V] pass
    log_s = F.log_softmax(scaled, dim=-1).gather(-1, ids.clamp_min(0))
    p_s = torch.where(listed, log_s.exp(), 0.0)
    tail_s = (1.0 - p_s.sum(-1, keepdim=True)).clamp_min(PROB_FLOOR)
    p_s = torch.cat([p_s, tail_s], dim=-1)
    log_p_s = torch.cat([log_s, tail_s.log()], dim=-1)  # finite; weighted by 0 where padded
    p_t = torch.where(listed, target_logprobs.reshape(ids.shape).to(dtype).exp(), 0.0)
    p_t = torch.cat([p_t, (1.0 - p_t.sum(-1, keepdim=True)).clamp_min(0.0)], dim=-1)
    return logits, p_s, log_p_s, p_t, safe_log(p_t)


class _ChunkedRows(torch.autograd.Function):
    """values [N] = fn(logits[rows], *rest[rows]) over the rows where ``mask`` is True, in chunks
    of ``chunk`` positions; 0 at the other rows, which are never read.

    Why: computed at once, a [N, V] loss keeps float32 copies of the whole logits alive (the
    upcast, log_softmax's output saved for backward, cross-entropy's own log_softmax) -- at
    N = 4096 positions and V = 151,936 each is 2.5 GB. Here only one chunk's [chunk, V]
    intermediates exist at a time: each chunk's gradient d values / d logits (one row of
    logits feeds only its own value) is taken in the forward pass, written into one [N, V]
    buffer in the logits' dtype -- the size of the logits' gradient, which backward needs
    anyway -- and backward scales that buffer in place by the incoming per-row weights.
    The target tensors get no gradient; backward runs once (no retain_graph re-use).

    Shapes: logits [..., V] (N = the leading sizes' product, row-major), mask [N] bool,
    rest: tensors [N, ...] or None -> values [N].
    """

    @staticmethod
    def forward(ctx, logits, fn, chunk, mask, *rest):
        need_grad = ctx.needs_input_grad[0]
        lead = logits.shape[:-1]  # [B, L] or [N]: rows are read in place, so a strided view
        values = torch.zeros(lead.numel(), dtype=_compute_dtype(logits), device=logits.device)
        grad = None
        if need_grad:  # every row is written below: zero only the rows that carry no loss
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            grad[torch.unravel_index((~mask).nonzero().squeeze(1), lead)] = 0
        for start in range(0, lead.numel(), chunk):
            rows = mask[start:start + chunk].nonzero().squeeze(1) + start
            if rows.numel() == 0:
                continue  # a chunk of prompt or padding: nothing to compute
            where = torch.unravel_index(rows, lead)
            x = logits[where]  # [c, V], a copy of one chunk only (logits[:, :-1] is never copied whole)
            args = [None if a is None else a.index_select(0, rows) for a in rest]
            if need_grad:
                with torch.enable_grad():
                    x.requires_grad_(True)
                    v = fn(x, *args)
                    (g,) = torch.autograd.grad(v.sum(), x)  # row i's gradient of its own value
                grad[where] = g
            else:
                v = fn(x, *args)
            values.index_copy_(0, rows, v.detach())
        ctx.grad = grad
        return values

    @staticmethod
    def backward(ctx, grad_values):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("the chunked top-k loss backpropagates once; recompute the loss to do it again")
        grad.mul_(grad_values.view(*grad.shape[:-1], 1).to(grad.dtype))  # in place: no second [N, V] buffer
        return (grad, None, None, None) + (None,) * (len(ctx.needs_input_grad) - 4)


# Positions per chunk: at V = 151,936 one float32 [1024, V] slice is 0.6 GB. Chunks of 256 peak
# at 0.71 of this (BENCHMARKS.md, both V) but were slower at V = 49,152 on a busy machine: kept.
DEFAULT_CHUNK = 1024


class _TopKLoss(nn.Module):
    """Shared forward of the top-k losses; subclasses give the per-position loss.

    Shapes: student_logits [N, V] (or [B, L, V]), target_ids [N, k] long (padding id -1),
    target_logprobs [N, k] (softened at T, as ``ensemble_topk`` writes them), labels [N]
    long, mask [N] bool (default all True): the positions that carry loss (for a causal LM,
    the response tokens; prompt and padding positions are False). [B, L, ...] inputs are
    flattened to N = B * L (so a window's [B, L-1] logits go with a [B, L-1] mask).
    Returns the mean over positions where mask is True (0 when none is): a scalar.

    chunk_size: positions per chunk (see ``_ChunkedRows``); masked positions are skipped and
    their logits never read. None computes every position at once, as the unchunked loss
    did (the benchmark's reference): same values, more memory.
    """

    def __init__(self, temperature: float = 1.0, chunk_size: int | None = DEFAULT_CHUNK):
        super().__init__()
        _check_temperature(temperature)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.temperature = temperature
        self.chunk_size = chunk_size

    def forward(self, student_logits, target_ids, target_logprobs, labels=None, mask=None):
        _check_topk_shapes(student_logits, target_ids, target_logprobs)
        n = target_ids.shape[:-1].numel()
        if mask is None:
            mask = torch.ones(n, dtype=torch.bool, device=student_logits.device)
        elif mask.shape != target_ids.shape[:-1]:
            raise ValueError(f"mask {tuple(mask.shape)} must be {tuple(target_ids.shape[:-1])}, "
                             f"one flag per position")
        mask = mask.reshape(-1).bool()
        flat = None if labels is None else labels.reshape(-1)

        def summed(rows):
            if self.chunk_size is None:
                per_position = rows(student_logits, target_ids, target_logprobs, flat, mask)
            else:
                per_position = _ChunkedRows.apply(
                    student_logits, rows, self.chunk_size, mask,
                    target_ids.reshape(n, -1), target_logprobs.reshape(n, -1), flat)
            return torch.where(mask, per_position, 0.0).sum()  # masked junk (even NaN) never leaks

        return self.mean_over_rows(summed, labels, n, mask.sum().clamp_min(1))

    def mean_over_rows(self, summed, labels, n: int, count):
        """The loss's scaffolding, shared by ``forward`` and the fused head (orchestrator/fused_head.py),
        which differ only in how they get the rows' logits: checks ``labels`` (one per position where
        the loss reads them; n positions), calls ``summed(rows)``, which applies the per-row loss
        ``rows(logits [c, V], ids [c, k], logprobs [c, k], labels [c] or None, mask [c] or None) -> [c]``
        to the ``count`` positions that carry loss, chunk by chunk or at once, and returns the sum of
        their values (a scalar, with its gradients); returns that sum / count, and sets ``last_soft``
        (kd's soft term alone, mean over the same positions; None for the other losses)."""
        self._check_labels(labels, n)
        self._soft_sum = 0.0  # TopKKDLoss adds each chunk's soft term here
        total = summed(self._rows)
        self.last_soft = (self._soft_sum / count).detach() if torch.is_tensor(self._soft_sum) else None
        return total / count

    def _rows(self, logits, ids, logprobs, labels, mask=None):
        """Per-position loss of some rows: logits [c, V], ids / logprobs [c, k], labels [c] -> [c]."""
        logits, p_s, log_p_s, p_t, log_p_t = _topk_buckets(logits, ids, logprobs, self.temperature)
        if mask is None:  # chunked: only rows that carry loss are passed
            mask = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        return self._per_position(logits, p_s, log_p_s, p_t, log_p_t, labels, mask)

    def _check_labels(self, labels, n: int) -> None:
        pass

    def _per_position(self, logits, p_s, log_p_s, p_t, log_p_t, labels, mask):
        raise NotImplementedError


class TopKForwardKL(_TopKLoss):
    """T^2 * KL(p_t || p_s) over the target's k listed tokens + the tail bucket."""

    def _per_position(self, logits, p_s, log_p_s, p_t, log_p_t, labels, mask):
        return self.temperature**2 * kl_div(p_t, log_p_t, log_p_s)


class TopKReverseKL(_TopKLoss):
    """T^2 * KL(p_s || p_t) over the target's k listed tokens + the tail bucket."""

    def _per_position(self, logits, p_s, log_p_s, p_t, log_p_t, labels, mask):
        return self.temperature**2 * kl_div(p_s, log_p_s, log_p_t)


class TopKJSD(_TopKLoss):
    """T^2 * generalised JSD (see ``JSD``) over the k listed tokens + the tail bucket."""

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, chunk_size: int | None = DEFAULT_CHUNK):
        super().__init__(temperature, chunk_size)
        _check_unit("beta", beta)
        self.beta = beta

    def _per_position(self, logits, p_s, log_p_s, p_t, log_p_t, labels, mask):
        b = self.beta
        log_m = safe_log(b * p_t + (1.0 - b) * p_s)
        jsd = b * kl_div(p_t, log_p_t, log_m) + (1.0 - b) * kl_div(p_s, log_p_s, log_m)
        return self.temperature**2 * jsd


class TopKKDLoss(_TopKLoss):
    """alpha * CE(student at T=1, labels) + (1 - alpha) * T^2 * KL(p_t || p_s) over k+1 buckets.

    labels are required; a masked position's label is never read (it may be -100).
    ``last_soft``: the soft term alone, mean over the masked-in positions (for metrics).
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 1.0, chunk_size: int | None = DEFAULT_CHUNK):
        super().__init__(temperature, chunk_size)
        _check_unit("alpha", alpha)
        self.alpha = alpha

    def _check_labels(self, labels, n: int) -> None:
        if labels is None or labels.numel() != n:
            raise ValueError(f"kd needs one label per position ({n}), got "
                             f"{None if labels is None else tuple(labels.shape)}")

    def _per_position(self, logits, p_s, log_p_s, p_t, log_p_t, labels, mask):
        hard = F.cross_entropy(logits, torch.where(mask, labels, 0), reduction="none")
        soft = self.temperature**2 * kl_div(p_t, log_p_t, log_p_s)
        self._soft_sum = self._soft_sum + torch.where(mask, soft, 0.0).sum().detach()  # summed over chunks
        return self.alpha * hard + (1.0 - self.alpha) * soft


def build_topk_loss(name: str, *, alpha: float = 0.5, beta: float = 0.5, temperature: float = 1.0,
                    chunk_size: int | None = DEFAULT_CHUNK) -> nn.Module:
    """Top-k (sparse target) loss module by name (one of ``LOSSES``); alpha for "kd", beta for "jsd";
    chunk_size positions at a time (None: all at once)."""
    family = {"kd": TopKKDLoss, "forward_kl": TopKForwardKL, "reverse_kl": TopKReverseKL, "jsd": TopKJSD}
    loss = _build(family, name, alpha, beta, temperature)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    loss.chunk_size = chunk_size
    return loss
