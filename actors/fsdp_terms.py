"""train.extra_losses under train.strategy fsdp: the hint projections beside an FSDP student.

The projections (orchestrator/extra_terms.py ExtraTerms) stay outside FSDP's wrapper, a whole
copy on every worker, as under DDP: their gradients are averaged over the workers by
``terms.sync_grads()`` before each optimiser step (actors/student.py ``_optimiser_step``).
Two things differ from DDP:

- grad_clip: one norm over the student and the projections, as under DDP, but the student's part
  is FSDP's total norm over every rank's shards (``clip_grad_norm`` here); every rank then scales
  its shards and its (identical) projections by the same factor.
- the optimiser: FSDP gathers its optimiser state for the checkpoint by parameter name
  (``FSDP.optim_state_dict``), which fails on a parameter outside the FSDP module ("KeyError" in
  torch 2.13). So the projections get an AdamW of their own with the same settings and the same
  LR schedule (``TermsOptimiser``; AdamW updates each parameter alone: the same steps as one
  optimiser over both), checkpointed beside the student's as ``extra_terms_optimizer`` (rank 0's
  copy: every rank's is the same).
"""
from __future__ import annotations

import torch

from actors.train_state import _is_fsdp as is_fsdp  # noqa: F401 (actors/student.py reads it here)


def clip_grad_norm(model, terms, max_norm: float) -> torch.Tensor:
    """Scale the gradients of an FSDP `model`'s shards and of `terms`' projections (averaged
    already) so that their one global norm is at most `max_norm` -> that norm, before scaling.
    A collective: every rank calls it."""
    if terms is None:
        return model.clip_grad_norm_(max_norm)
    # FSDP's norm over every rank's shards; with an infinite max_norm its scale factor is 1.
    student = model.clip_grad_norm_(float("inf"))
    own = torch.nn.utils.get_total_norm([p.grad for p in terms.parameters() if p.grad is not None])
    total = torch.linalg.vector_norm(torch.stack([student.float(), own.float().to(student.device)]))
    torch.nn.utils.clip_grads_with_norm_([*model.parameters(), *terms.parameters()], max_norm, total)
    return total


class TermsOptimiser:
    """The projections' own AdamW and LR schedule, stepped with the student's (same lr, weight
    decay and schedule)."""

    def __init__(self, terms, config: dict, schedule):
        self.opt = torch.optim.AdamW(terms.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)

    def step(self) -> None:
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
