"""A train worker's checkpoint: what rank 0 writes, and reading it back (actors/student.py)."""
from __future__ import annotations

import json
import os
import tempfile

import torch

import ray.train

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"


def load_state(checkpoint) -> dict:
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)


def gather(obj, ctx) -> list:
    out = [None] * ctx.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def save_and_report(model, opt, sched, metrics: dict, ctx, record: dict) -> None:
    """Rank 0 writes the checkpoint, every rank reports. record: the rest of the state, plain data
    (epoch, history, spec, ``partial``: a mid-epoch checkpoint's counters, None at an epoch's end).
    Called right after an optimiser step: no gradients are pending."""
    rng = gather(torch.get_rng_state(), ctx)  # per rank: dropout masks continue exactly on resume
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if ctx.get_world_rank() == 0:
            raw = model.module if hasattr(model, "module") else model
            state = {"model": raw.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), **record,
                     "rng": rng}
            torch.save(state, os.path.join(d, STATE_FILE))
            with open(os.path.join(d, HISTORY_FILE), "w") as f:
                json.dump(record["history"], f)
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ckpt)
