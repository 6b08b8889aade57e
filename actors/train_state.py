"""A train worker's model wrapping (DDP or FSDP) and its checkpoint: what rank 0 writes, and
reading it back (actors/student.py)."""
from __future__ import annotations

import json
import os
import tempfile

import torch

import ray.train

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"


def load_state(checkpoint, mmap: bool = False) -> dict:
    """mmap (the driver, after training): tensors are read from the file as they are touched, so
    writing students/NAME.pt streams the optimiser's state instead of holding all of it (a file
    mapping stays valid after Ray removes a downloaded copy of a remote checkpoint)."""
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False, mmap=mmap)


def prepare(model, strategy: str, use_gpu: bool):
    """train.strategy: ``ddp`` (Ray Train's prepare_model), or ``fsdp``: torch's
    FullyShardedDataParallel (parameters, gradients and optimiser state sharded over the
    workers), one FSDP unit per decoder layer (the HF model's ``_no_split_modules``). A student
    that names none (the MLP classifier, transformers' sequence classifiers such as BERT's) is
    sharded whole, as one unit: each forward and backward gathers all of it, so fsdp saves the
    optimiser's and the stored weights' memory there, not the peak of one pass.

    On GPU that is Ray Train's prepare_model(parallel_strategy="fsdp"). Ray 2.60's prepare_model
    refuses it without CUDA ("FSDP is only available with GPU-enabled training"), and torch's
    FSDP needs ``device_id=cpu`` there ("FSDP needs a non-CPU accelerator device"): on CPU
    (gloo) the same wrapper is applied here, as Ray would, after prepare_model without one.
    """
    import ray.train.torch

    if strategy == "ddp":
        return ray.train.torch.prepare_model(model)
    kwargs = fsdp_kwargs(model)
    if "auto_wrap_policy" not in kwargs and ray.train.get_context().get_world_rank() == 0:
        print(f"train: train.strategy fsdp: {type(model).__name__} names no layer to wrap (_no_split_modules): "
              "the whole student is one FSDP unit", flush=True)
    if use_gpu:
        return ray.train.torch.prepare_model(model, parallel_strategy="fsdp", parallel_strategy_kwargs=kwargs)
    model = ray.train.torch.prepare_model(model, parallel_strategy=None)
    if ray.train.get_context().get_world_size() == 1:
        return model  # as prepare_model: nothing to shard over
    return fsdp_on_cpu(model, kwargs)


def fsdp_kwargs(model) -> dict:
    """FSDP's settings for a student: use_orig_params, one unit per decoder layer (the HF model's
    ``_no_split_modules``; none named: one unit for the whole model)."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = {type(m) for m in model.modules() if type(m).__name__ in names}
    return {"use_orig_params": True, **({"auto_wrap_policy": ModuleWrapPolicy(layers)} if layers else {})}


def fsdp_on_cpu(model, kwargs: dict | None = None):
    """`prepare`'s FSDP wrapper on CPU (gloo), in an initialised process group of >= 2 ranks; also
    what benchmarks/scale_fsdp.py wraps with outside Ray Train. kwargs: fsdp_kwargs(model) (computed
    here when not given)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), **(kwargs or fsdp_kwargs(model)))


def _full_state_dicts(model, opt):
    """FSDP: the whole model's and optimiser's state gathered on rank 0 (a collective: every rank
    calls it; the others get empty dicts). offload_to_cpu stays off: with it, gathering on CPU
    segfaults in torch 2.13 (and the tensors are on the CPU already)."""
    from torch.distributed.fsdp import (FullOptimStateDictConfig, FullStateDictConfig, FullyShardedDataParallel as FSDP,
                                        StateDictType)

    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
                              FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)):
        return model.state_dict(), FSDP.optim_state_dict(model, opt)


def _is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def load_optimizer(model, opt, saved: dict) -> None:
    """Restore the optimiser from a checkpoint's (whole) optimiser state; FSDP: each rank's shard of it."""
    if _is_fsdp(model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        saved = FSDP.optim_state_dict_to_load(model, opt, saved)
    opt.load_state_dict(saved)


def gather(obj, ctx) -> list:
    out = [None] * ctx.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def save_and_report(model, opt, sched, metrics: dict, ctx, record: dict) -> None:
    """Rank 0 writes the checkpoint, every rank reports. record: the rest of the state, plain data
    (epoch, history, spec, ``partial``: a mid-epoch checkpoint's counters, None at an epoch's end).
    Called right after an optimiser step: no gradients are pending."""
    rng = gather(torch.get_rng_state(), ctx)  # per rank: dropout masks continue exactly on resume
    if _is_fsdp(model):
        weights, optimiser = _full_state_dicts(model, opt)
    else:
        weights, optimiser = (model.module if hasattr(model, "module") else model).state_dict(), opt.state_dict()
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if ctx.get_world_rank() == 0:
            state = {"model": weights, "optimizer": optimiser, "scheduler": sched.state_dict(), **record, "rng": rng}
            torch.save(state, os.path.join(d, STATE_FILE))
            with open(os.path.join(d, HISTORY_FILE), "w") as f:
                json.dump(record["history"], f)
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ckpt)
