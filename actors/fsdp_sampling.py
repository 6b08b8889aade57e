"""The whole student for on-policy sampling (train.on_policy) when train.strategy is fsdp.

Sampling runs the student's decode loop (orchestrator/generation.py), dozens of forwards of
different shapes per batch, on each worker, for that worker's own prompts. Under FSDP a worker
holds only its shards. Chosen here: gather the whole weights once per on-policy batch
(``FullyShardedDataParallel.summon_full_params``, writeback off), sample, and free them on
leaving the block. The alternative, stepping every rank through the FSDP module in lockstep
(HF's ``synced_gpus``: all-reduce an "all done" flag per token, dummy forwards on finished
ranks), holds one layer at a time but all-gathers the whole weights once per generated token
(max_new_tokens times per batch instead of once), and it needs its own decode loop.

summon_full_params is a collective: every rank must enter it as often as the others. It is
entered once per on-policy batch, a choice every rank makes alike (orchestrator/on_policy.py
``is_on_policy``: a function of seed, epoch and batch) over the same number of batches (as DDP's
gradient all-reduce already needs), also by a rank whose batch has no prompt to complete.

FSDP's forward may not run inside summon_full_params (it would reshard the gathered weights),
and the student's decoder layers are FSDP units. So the decode loop runs a weightless copy of
the unwrapped student (``skeleton``: meta tensors, made before FSDP wraps it, no memory) with the
gathered tensors swapped in for each call (torch.func.functional_call), never FSDP's wrappers.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from actors.train_state import _is_fsdp as is_fsdp


def skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` (unwrapped) with every parameter and buffer on the meta device: its
    structure without its memory; tied weights stay tied. In eval mode: no dropout in sampling."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo).eval()


class _Bound:
    """`skeleton` called with `weights` (name -> tensor): what generation.sample calls as a model."""

    def __init__(self, skel: torch.nn.Module, weights: dict[str, torch.Tensor]):
        self.skel, self.weights = skel, weights

    def __call__(self, **kwargs):
        return torch.func.functional_call(self.skel, self.weights, args=(), kwargs=kwargs)

    def parameters(self):
        return iter(self.weights.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the unwrapped student's state_dict holds (no non-persistent buffers such as RoPE's
        inv_freq, which no checkpoint has): the vllm sampler copies these in."""
        return {n: self.weights[n] for n in self.skel.state_dict()}

    @property
    def config(self):
        return self.skel.config


@contextlib.contextmanager
def whole_student(model, skel: torch.nn.Module | None):
    """-> a model to sample with, holding the whole weights while the block runs. DDP (or a single
    worker's unsharded model): its module in eval mode. FSDP: `skel` with the gathered weights
    (a collective: every rank enters it alike), freed on leaving the block."""
    if not is_fsdp(model):
        module = model.module if hasattr(model, "module") else model  # DDP: sample without its hooks
        module.eval()  # no dropout while sampling
        try:
            yield module
        finally:
            module.train()
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False, recurse=True):
        # Inside the block FSDP names parameters and buffers as the unwrapped module does.
        weights = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        want = {**dict(skel.named_parameters()), **dict(skel.named_buffers())}
        if set(weights) != set(want):  # a wrapper whose names we do not know: fail, never sample from a shard
            differ = sorted(set(weights) ^ set(want))[:4]
            raise RuntimeError(f"fsdp sampling: the gathered weights' names differ from the student's: {differ}")
        if bad := [n for n, t in weights.items() if t.shape != want[n].shape]:
            raise RuntimeError(f"fsdp sampling: {bad[0]} is not whole ({tuple(weights[bad[0]].shape)})")
        yield _Bound(skel, weights)
