"""The Ray Train loop: DDP student trained against the label store, a checkpoint per epoch
(and every ``checkpoint_every`` optimiser steps within one).

``config`` carries plain data only: the student spec (see orchestrator.models.build_student),
the loss settings and the optimisation budget. Rank 0 writes the checkpoint (model, optimiser,
epoch, history) and every rank reports, so a restarted or resumed run continues from the
latest checkpoint with the same history. A mid-epoch checkpoint also records how many batches
of its epoch were consumed and every rank's RNG state: the resumed run skips exactly those
batches of the same (seeded) epoch order, so no row is seen twice or skipped.

Over 300 lines: the loop and its per-worker helpers (epoch order, live metrics, the two step
kinds) stay together so the order of operations in a worker reads top-down in one file (the
on-policy step is its own module, actors/on_policy.py).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time

import torch

import ray
import ray.train
import ray.train.torch

from actors import fsdp_sampling, fsdp_terms
from actors.lm_batch import LMBatch, decode_targets
from actors.on_policy import OnPolicy
from actors.train_state import (HISTORY_FILE, STATE_FILE, gather, load_optimizer, load_state,  # noqa: F401 (re-exported)
                                prepare, save_and_report)
from orchestrator.cls_students import cls_logits
from orchestrator.extra_terms import ExtraTerms
from orchestrator.fused_head import plan as plan_fused_head
from orchestrator.lm_extra_terms import LMExtraTerms, feature_shapes
from orchestrator.losses import build_loss, build_topk_loss
from orchestrator.models import build_student, check_packing
from orchestrator.schedule import lr_lambda
from orchestrator.store import SOFT_COLUMN


class EpochLog(ray.train.UserCallback):
    """Runs in the Train controller: one progress line per epoch, throughput summed over workers."""

    def __init__(self, name: str, epochs: int):
        self.name, self.epochs = name, epochs

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0]
        if m.get("partial"):  # a mid-epoch checkpoint (train.checkpoint_every)
            print(f"train: {self.name} checkpoint at step {m['step']} (epoch {m['epoch'] + 1}, batch {m['batches']})", flush=True)
            return
        rate = sum(w["samples_per_s"] for w in metrics)
        print(f"train: {self.name} epoch {m['epoch'] + 1}/{self.epochs} loss {m['loss']:.4f} {rate:,.0f} {m.get('unit', 'samples')}/s",
              flush=True)


class EpochBatches:
    """A worker's batches for each epoch, in an order fixed by (seed, epoch).

    The first epoch streams the shard from Ray Data (local shuffle seeded with seed + epoch).
    If the whole shard fits in ``max_rows``, it is kept, sorted by store row, and later epochs
    replay it from memory in a permutation seeded with seed + epoch: on small stores a new
    streaming execution per epoch costs more than the epoch itself. ``skip`` leaves out the
    first batches of that same order (a mid-epoch resume).
    """

    def __init__(self, shard, batch_size: int, seed: int, shuffle_buffer: int, max_rows: int, collate_fn=None):
        self.shard, self.batch_size, self.seed, self.collate_fn = shard, batch_size, seed, collate_fn
        self.shuffle_buffer, self.max_rows = shuffle_buffer, max_rows
        self.cache: dict[str, torch.Tensor] | None = None

    def __call__(self, epoch: int, skip: int = 0):
        if self.cache is not None:
            n = len(next(iter(self.cache.values())))
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
            for i in range(skip * self.batch_size, n, self.batch_size):
                yield {k: v[order[i : i + self.batch_size]] for k, v in self.cache.items()}
            return
        kept, rows = [], 0
        stream = self.shard.iter_torch_batches(batch_size=self.batch_size, local_shuffle_buffer_size=self.shuffle_buffer,
                                               collate_fn=self.collate_fn,
                                               local_shuffle_seed=self.seed + epoch)
        # Skipped batches are still read (and kept): the local shuffle's order depends on every
        # block before it, so the stream is replayed from its start, which is cheap next to training.
        for i, batch in enumerate(stream):
            rows += len(next(iter(batch.values())))
            kept = kept if kept is not None and rows <= self.max_rows else None
            if kept is not None:
                kept.append(batch)
            if i >= skip:
                yield batch
        if kept:
            self._keep(kept)

    def _keep(self, kept: list[dict]) -> None:
        # In store-row order, so that the replayed epochs' order does not depend on which epoch
        # this process streamed first (a resumed run streams a later one): see prime().
        cache = {k: torch.cat([b[k] for b in kept]) for k in kept[0]}
        if "row" in cache:
            by_row = torch.argsort(cache["row"])
            cache = {k: v[by_row] for k, v in cache.items()}
        self.cache = cache

    def prime(self) -> None:
        """Read the shard into memory without yielding it: a run resumed after epoch 0 of a shard
        that was replayed from memory replays the same cache (the streamed order is irrelevant)."""
        for _ in self(0, skip=2**62):
            pass


class LiveMetrics:
    """distill_train_* gauges and, from rank 0, a progress line every PRINT_EVERY_S within long
    epochs (the controller prints one line per epoch). Windowed: values cover the last ~second."""

    PRINT_EVERY_S = 10.0

    def __init__(self, config: dict, rank: int, step: int):
        from actors import metrics

        self.m, self.rank, self.total_steps = metrics.trainer(), rank, step
        self.name, self.epochs = config.get("name", "student"), config["epochs"]
        self.tags = {"run": config.get("run", ""), "student": self.name}
        self.window_start = self.last_print = time.perf_counter()
        self.loss = self.soft = 0.0
        self.n = self.steps = 0

    def step(self, loss: float, soft, n: int, epoch: int) -> None:
        self.total_steps += 1
        self.steps += 1
        self.n += n
        self.loss += loss
        self.soft += float(soft) if soft is not None else loss
        now = time.perf_counter()
        if now - self.window_start < 1.0:
            return
        rate, loss, soft = self.n / (now - self.window_start), self.loss / self.steps, self.soft / self.steps
        self.m["samples_per_s"].set(rate, tags={**self.tags, "rank": str(self.rank)})
        if self.rank == 0:
            self.m["loss"].set(loss, tags=self.tags)
            self.m["kd_loss"].set(soft, tags=self.tags)
            self.m["step"].set(self.total_steps, tags=self.tags)
            if now - self.last_print >= self.PRINT_EVERY_S:
                print(f"train: {self.name} epoch {epoch + 1}/{self.epochs} step {self.total_steps} loss {loss:.4f} "
                      f"{rate:,.0f}/s on rank 0", flush=True)
                self.last_print = now
        self.window_start, self.loss, self.soft, self.n, self.steps = now, 0.0, 0.0, 0, 0

    def epoch_done(self, epoch: int) -> None:
        if self.rank == 0:
            self.m["epoch"].set(epoch + 1, tags=self.tags)
            self.m["step"].set(self.total_steps, tags=self.tags)


def _classifier_step(model, loss_fn, batch: dict, config: dict, terms: ExtraTerms | None = None):
    x, y, target = batch["features"].float(), batch["label"].long(), batch[SOFT_COLUMN].float()
    # student.arch hf: a sequence classifier reading the features as token ids (as the hf teachers do)
    spec = config["student"]
    if terms is not None:  # train.extra_losses: the same forward also yields the outputs the terms read
        logits, extra = terms.step(model, x, batch, spec.get("pad_token_id"))
        return loss_fn(logits, target, y) + extra, len(y)
    logits = cls_logits(model, x, spec.get("pad_token_id")) if spec["arch"] == "hf" else model(x)
    return loss_fn(logits, target, y), len(y)


def _lm_step(model, loss_fn, batch: dict, config: dict, terms=None, head=None):
    """Rows [B, L]: at each position that carries loss (all of a text window's; a packed
    instruction row's response tokens), its logits vs the top-k target for the next token
    (+ train.extra_losses from the same forward: orchestrator/lm_extra_terms.py).
    head (orchestrator/fused_head.py FusedHead): the head + loss over those positions' hidden
    states in chunks, without the model's [B, L, V] logits; None: from the full logits."""
    x, sel = batch["input_ids"].long(), batch["sel"]
    cpu_sel = sel.cpu()  # the codec is numpy
    target_ids, target_lps = decode_targets(batch["gaps"].cpu()[cpu_sel], batch["codes"].cpu()[cpu_sel], config["k"])
    sel = sel.to(x.device)
    # Packed rows: position ids restart per example, which keeps attention within it (and the
    # cache off, without which transformers would not look for packed sequences).
    kwargs = {"position_ids": batch["position_ids"].long(), "use_cache": False} if "position_ids" in batch else {}
    if terms is not None:  # the same forward also yields the hidden states the terms read
        rows, extra = terms.lm_step(model, x, kwargs, sel, batch, head)  # [N, H] hidden if head, else [N, V] logits
    elif head is not None:  # fused: no [B, L, V] (nor [N, V]) logits
        rows, extra = head.hidden(model, x, kwargs, sel), None  # [N, H]
    else:
        rows, extra = model(input_ids=x, **kwargs).logits[:, :-1][sel], None  # [N, V]
    dev = rows.device
    args = (target_ids.to(dev), target_lps.to(dev), x[:, 1:][sel])
    loss = loss_fn(rows, *args) if head is None else head.loss(loss_fn, rows, *args)
    return (loss if extra is None else loss + extra), int(sel.sum())


def _optimiser_step(model, opt, sched, grad_clip: float | None, terms=None, terms_opt=None) -> None:
    """One optimiser step. ``terms`` (train.extra_losses): the projections' gradients are averaged
    over the workers first (DDP has averaged the student's in backward), so that grad_clip takes one
    norm over student + projections from the gradients every rank then applies alike.
    terms_opt (fsdp with terms): the projections' own optimiser (actors/fsdp_terms.py)."""
    if terms is not None:
        terms.sync_grads()
    if grad_clip is not None:
        if fsdp_terms.is_fsdp(model):  # FSDP's norm over every rank's shards (+ the projections')
            fsdp_terms.clip_grad_norm(model, terms, grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_([*model.parameters(), *(terms.parameters() if terms is not None else [])],
                                           grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if terms_opt is not None:
        terms_opt.step()


def train_loop(config: dict) -> None:
    # Ray Train's worker narrates every report at INFO through loggers we cannot name: warn only.
    logging.getLogger().setLevel(logging.WARNING)
    torch.manual_seed(config["seed"])
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    ctx = ray.train.get_context()
    model = build_student(config["student"])
    # train.extra_losses: hooks on the unwrapped student; hint projections checkpointed beside it, not in it
    terms = (LMExtraTerms if config["task"] == "lm" else ExtraTerms)(config["extra_terms"], model) \
        if config.get("extra_terms") else None
    start, history, resumes, resumed_at, partial, replayed = 0, [], [], [], None, False
    hooks = config.get("test_hooks") or {}  # TEST ONLY (tests/test_resume.py; see training.TEST_HOOKS_ENV)
    checkpoint = ray.train.get_checkpoint()
    state = load_state(checkpoint) if checkpoint else None
    if state:  # the whole model's weights, before FSDP (if used) shards them
        model.load_state_dict(state["model"])
        if terms is not None:
            terms.load_state_dict(state["extra_terms"])
    if "position_ids" in config.get("columns", []):  # packed instruction rows: examples must stay apart
        check_packing(model, "the student")
    head = plan_fused_head(model, config.get("strategy", "ddp"), terms is not None, ctx.get_world_rank() == 0) \
        if config["task"] == "lm" else None  # the LM step's head + loss without the full logits, when it may
    # train.on_policy under fsdp: the student's weightless copy that samples with the gathered weights
    skeleton = fsdp_sampling.skeleton(model) if config.get("on_policy") and config.get("strategy") == "fsdp" else None
    if config.get("gradient_checkpointing"):  # after the skeleton: sampling keeps its activations (no backward)
        # transformers' own, non-reentrant: every parameter still gets one gradient in one backward (DDP, FSDP)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if ctx.get_world_rank() == 0:
            print("train: activations recomputed layer by layer in backward (train.gradient_checkpointing)", flush=True)
    model = prepare(model, config.get("strategy", "ddp"), bool(config.get("use_gpu")))
    # The optimiser after wrapping: FSDP replaces the parameters with views of its shards.
    # fsdp + train.extra_losses: the projections get their own optimiser (actors/fsdp_terms.py)
    own = terms is not None and fsdp_terms.is_fsdp(model)
    opt = torch.optim.AdamW([*model.parameters(), *(terms.parameters() if terms and not own else [])], lr=config["lr"],
                            weight_decay=config["weight_decay"])
    schedule = functools.partial(lr_lambda, warmup_steps=config["warmup_steps"], total_steps=config["total_steps"],
                                 schedule=config["schedule"], min_ratio=config["min_lr_ratio"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    terms_opt = fsdp_terms.TermsOptimiser(terms, config, schedule) if own else None
    if state:  # restarted after a failure, or a re-run of the same run name: resume
        load_optimizer(model, opt, state["optimizer"])
        if "scheduler" in state:
            sched.load_state_dict(state["scheduler"])
        if terms_opt is not None:
            terms_opt.load_state_dict(state["extra_terms_optimizer"])
        # partial: a mid-epoch checkpoint's counters (batches consumed in its epoch, ...), else None
        history, partial, replayed = state["history"], state.get("partial"), state.get("replayed", False)
        start = state["epoch"] + (0 if partial else 1)
        resumes = state.get("resumed_after_epoch", []) + ([] if partial else [state["epoch"]])
        resumed_at = state.get("resumed_at", []) + [[start, partial["batches"] if partial else 0]]
        if state.get("rng") and len(state["rng"]) == ctx.get_world_size():  # dropout continues as it would have
            torch.set_rng_state(state["rng"][ctx.get_world_rank()])
        if ctx.get_world_rank() == 0:
            where = f"batch {partial['batches']} of epoch {start + 1}" if partial else f"epoch {start}"
            print(f"train: resuming after {where} from its checkpoint", flush=True)
    # Where every worker runs (rank order): kept in the checkpoint so placement can be checked.
    nodes = [None] * ctx.get_world_size()
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    lm = config["task"] == "lm"
    make_loss = build_topk_loss if lm else build_loss
    loss_fn = make_loss(config["loss"], alpha=config["alpha"], beta=config["beta"], temperature=config["temperature"])

    epoch_batches = EpochBatches(ray.train.get_dataset_shard("train"), config["batch_size"], config["seed"],
                                 config["shuffle_buffer"], config["cache_rows"],
                                 LMBatch(config["columns"], config["k"], feature_shapes(config.get("extra_terms"))) if lm else None)
    if replayed and start > 0:  # the uninterrupted run replays this epoch from memory: so do we
        epoch_batches.prime()
    done_steps = sum(h.get("steps", 0) for h in history)  # optimiser steps, over all completed epochs

    def checkpoint_now(metrics: dict, epoch: int, partial: dict | None = None) -> None:
        save_and_report(model, opt, sched, metrics, ctx, {
            "epoch": epoch, "history": history, "spec": config["student"], "worker_nodes": nodes,
            "resumed_after_epoch": resumes, "resumed_at": resumed_at, "partial": partial,
            "replayed": epoch_batches.cache is not None,  # later epochs replay the shard from memory: a resume must too
            **({"extra_terms": terms.state_dict()} if terms is not None else {}),
            **({"extra_terms_optimizer": terms_opt.state_dict()} if terms_opt is not None else {})})

    live = LiveMetrics(config, ctx.get_world_rank(), step=done_steps + (partial["steps"] if partial else 0))
    on_policy = OnPolicy(config, ctx, skeleton)  # train.on_policy (inert without it): the student's samples, scored by Serve teachers
    accum, max_steps, every = config["grad_accum"], config["max_steps"], config.get("checkpoint_every")
    # bf16 autocast on a GPU (float32 master weights; the losses upcast to float32 inside).
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if config.get("use_gpu") else contextlib.nullcontext()
    for epoch in range(start, config["epochs"]):
        if max_steps is not None and done_steps >= max_steps:
            break
        model.train()
        t0, seen, total, steps, micro, rows, spent = time.perf_counter(), 0, 0.0, 0, 0, [], 0.0
        if partial:  # resumed mid-epoch: carry on the epoch's counters, skip its consumed batches
            seen, total, steps, micro, spent = (partial[k] for k in ("seen", "total", "steps", "batches", "elapsed"))
            rows = partial["rows"][ctx.get_world_rank()] if "rows" in partial else []
            on_policy.resume(partial)
        skip, partial = micro, None
        opt.zero_grad(set_to_none=True)
        for batch in epoch_batches(epoch, skip=skip):
            micro += 1
            if hooks.get("record_rows"):
                rows += batch["row"].tolist()
            step_now = micro % accum == 0
            # DDP all-reduces on every backward; between optimiser steps the gradients only add up.
            sync = contextlib.nullcontext() if step_now or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast:
                    if (step_fn := on_policy.step_for(epoch, micro - 1)) is not None:  # train.on_policy
                        loss, n = step_fn(model, loss_fn, batch, config)
                    else:
                        loss, n = _lm_step(model, loss_fn, batch, config, terms, head) if lm else \
                            _classifier_step(model, loss_fn, batch, config, terms)
                (loss / accum).backward()
            seen, total = seen + n, total + loss.item() * n
            live.step(loss.item(), getattr(loss_fn, "last_soft", None), n, epoch)
            if step_now:
                _optimiser_step(model, opt, sched, config["grad_clip"], terms, terms_opt)
                steps += 1
                if max_steps is not None and done_steps + steps >= max_steps:
                    break
                if hooks.get("kill_at_step") == done_steps + steps and hooks.get("kill_rank") == ctx.get_world_rank() \
                        and not checkpoint:  # TEST ONLY: a worker killed mid-epoch, once (not after the restore)
                    os.kill(os.getpid(), signal.SIGKILL)
                if every and (done_steps + steps) % every == 0:  # train.checkpoint_every: a mid-epoch checkpoint
                    partial = {"batches": micro, "seen": seen, "total": total, "steps": steps,
                               "elapsed": spent + time.perf_counter() - t0}
                    if hooks.get("record_rows"):
                        partial["rows"] = gather(rows, ctx)
                    on_policy.checkpoint(partial)
                    metrics = {"epoch": epoch, "step": done_steps + steps, "batches": micro, "partial": True,
                               "loss": total / max(seen, 1)}
                    checkpoint_now(metrics, epoch, partial)
                    partial = None
        if micro % accum:  # an epoch's last, partial accumulation still makes a step
            _optimiser_step(model, opt, sched, config["grad_clip"], terms, terms_opt)
            steps += 1
        done_steps += steps
        elapsed = spent + time.perf_counter() - t0
        metrics = {
            "epoch": epoch,
            "loss": total / max(seen, 1),
            "samples": seen,  # tokens for a causal LM
            "samples_per_s": seen / max(elapsed, 1e-9),
            "unit": "tokens" if lm else "samples",
            "world_size": ctx.get_world_size(),
            "steps": steps,
            **({"gradient_checkpointing": True} if config.get("gradient_checkpointing") else {}),
            **({"extra_losses": terms.pop_means()} if terms is not None else {}),  # each term's mean, weighted
        }
        metrics.update(on_policy.epoch_metrics())  # on_policy_*: fraction, tokens, sample_nll, score_s
        if hooks.get("record_rows"):  # TEST ONLY: every rank's rows of this epoch, in the order consumed
            metrics["rows"] = gather(rows, ctx)
        history.append(metrics)
        live.epoch_done(epoch)
        checkpoint_now(metrics, epoch)

