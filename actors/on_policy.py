"""On-policy distillation (train.on_policy) on Ray: the Serve teachers kept up for the student's
training run (driver side), and the on-policy step of the train loop (worker side).

Driver: ``teachers_for_training`` deploys the teachers (or attaches to running `serve_app`
ones, which stay up), checks they serve the weights the store was labeled with, hands the train
loop what it needs as plain data, and shuts the deployed ones down after training (unless
pipeline.run holds them from labeling to evaluation: orchestrator/teacher_pool.py).

Worker: ``OnPolicy.step_for(epoch, batch)`` says whether a batch is on-policy (seeded: every
rank, and a resumed run, choose alike; orchestrator/on_policy.py) and gives the step to run then:
the batch's prompts completed by the current student (orchestrator/generation.py's seeded
sampler, on this worker; under train.strategy fsdp with the whole weights gathered for it:
actors/fsdp_sampling.py), scored by every teacher through its Serve handle (`score_batched`:
Serve batches the requests of all workers), ensembled as labeling does, and the chosen
divergence between the student and that target over the sampled positions.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np
import torch

from actors.fsdp_sampling import whole_student
from orchestrator.generation import sample
from orchestrator.instruct import targets
from orchestrator.losses import build_topk_loss
from orchestrator.on_policy import completion_rows, ensemble_scores, is_on_policy, prompts_of, sample_seed, sampled_tokens

log = logging.getLogger("distill")


@contextlib.contextmanager
def teachers_for_training(cfg, prep, store):
    """-> the loop's ``on_policy`` settings (None without train.on_policy), the teachers served
    while the block runs; the ones deployed here are shut down after it, even on failure."""
    if cfg.train.on_policy is None:
        yield None
        return
    from actors import teacher as serve_teachers
    from orchestrator import teacher_pool
    from orchestrator.labeling import _check_fingerprints
    from orchestrator.models import load_tokenizer
    from orchestrator.prompts import eos_ids
    from orchestrator.session import reraise_user_error

    tokenizer = load_tokenizer(prep.tokenizer)
    eos = sorted({i for t in cfg.teachers for i in eos_ids(t.name, Path(t.path), tokenizer)})
    teachers = {t.name: t.model_dump() for t in cfg.teachers}
    order = [t["name"] for t in prep.identity["teachers"]]
    apps = serve_teachers.attach([t for t in teachers.values() if t["serve_app"]])
    owned = teacher_pool.deploy(cfg.run.name, [t for t in teachers.values() if not t["serve_app"]], "lm", cfg.lm.k)
    try:
        apps = {n: {**apps, **owned}[n] for n in order}
        from orchestrator.instruct import rows_of

        try:
            infos = serve_teachers.probe(apps, rows_of(prep.train.slice(0, 1)))
        except Exception as e:  # noqa: BLE001  (a teacher that cannot take the rows: one line)
            reraise_user_error(e)
        _check_fingerprints(infos, prep.identity["teachers"], apps)
        log.info("train: on-policy teachers up (%s)", ", ".join(f"{n}: {a}" for n, a in apps.items()))
        if cfg.train.strategy == "fsdp":  # actors/fsdp_sampling.py: the memory that costs
            log.info("train: on-policy sampling under fsdp gathers the full student on each worker for every "
                     "on-policy batch (summon_full_params, freed after sampling): each worker briefly holds the "
                     "whole weights beside its shards")
        yield {**cfg.train.on_policy.model_dump(), "apps": apps, "chunk": {t.name: t.max_batch_size for t in cfg.teachers},
               "ensemble": store.manifest["ensemble"], "vocab_size": store.manifest["num_classes"],
               "max_len": cfg.lm.max_len, "eos_ids": eos, "vocab_limit": len(tokenizer),
               "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]}
    finally:
        if teacher_pool.release(owned):  # else a hold keeps them up for a later stage
            log.info("train: on-policy teachers shut down (%s)", ", ".join(owned.values()))


def sampled_logits(model, module, x: torch.Tensor, pos: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """The student's logits [N, V] at the N positions `sel` [W, L-1] selects (those predicting a
    sampled token), through `model` (DDP's forward: its gradient sync). Only positions from the
    first selected one on go through the head (`logits_to_keep`): the prompts before it, most of
    a row, never make [W, L, V] logits (and their gradient), which at L = 384 and V = 151,936
    were 1.7 GiB each for 8 rows (benchmarks/scale_lm_online.py)."""
    import inspect

    keep = x.shape[1]
    hits = sel.any(0).nonzero()
    if len(hits) and "logits_to_keep" in inspect.signature(module.forward).parameters:
        keep -= int(hits[0])  # logits of positions first .. L-1
        out = model(input_ids=x, position_ids=pos, use_cache=False, logits_to_keep=keep)
    else:  # a model without logits_to_keep: every position
        out = model(input_ids=x, position_ids=pos, use_cache=False)
    return out.logits[:, :-1][sel[:, sel.shape[1] - (keep - 1):]]


class OnPolicy:
    """One train worker's on-policy steps and their counters (this epoch's, checkpointed with a
    mid-epoch checkpoint). config: the train loop's; config["on_policy"]: teachers_for_training's."""

    def __init__(self, config: dict, ctx, skeleton=None):
        # skeleton (train.strategy fsdp): the student's weightless copy that samples with the
        # gathered weights (actors/fsdp_sampling.py); None: sample with the (DDP) module itself
        self.op, self.ctx, self.counters, self.skeleton = config.get("on_policy"), ctx, self.fresh(), skeleton
        self.vllm = None  # train.on_policy.sampler vllm: orchestrator/vllm_sampler.py, built when first needed
        if not self.op:  # inert: no on-policy batch, nothing checkpointed or reported
            return
        from ray import serve

        from actors import metrics

        self.k, self.seed, self.rank = config["k"], config["seed"], ctx.get_world_rank()
        self.handles = {n: serve.get_app_handle(a) for n, a in self.op["apps"].items()}
        self.loss_fn = build_topk_loss(self.op["divergence"], beta=self.op["beta"], temperature=config["temperature"])
        self.m = metrics.on_policy()
        self.tags = {"run": config.get("run", ""), "student": config.get("name", "student"), "rank": str(self.rank)}

    @staticmethod
    def fresh() -> dict:
        return {"batches": 0, "on_policy": 0, "tokens": 0, "nll_sum": 0.0, "score_s": 0.0}

    def step_for(self, epoch: int, batch: int):
        """None (an ordinary batch), or the on-policy step for batch `batch` (0-based) of `epoch`,
        with the signature of the loop's own steps: (model, loss_fn, batch, config) -> (loss, n)."""
        if not self.op:
            return None
        self.counters["batches"] += 1
        if not is_on_policy(self.seed, epoch, batch, self.op["fraction"], self.op["every"]):
            self.m["fraction"].set(self.counters["on_policy"] / self.counters["batches"], tags=self.tags)
            return None
        self.counters["on_policy"] += 1
        self.m["fraction"].set(self.counters["on_policy"] / self.counters["batches"], tags=self.tags)
        return lambda model, _loss_fn, rows, _config: self.step(model, rows, epoch, batch)

    def step(self, model, batch: dict, epoch: int, index: int):
        """-> (the divergence over the sampled positions, their count)."""
        op = self.op
        ids = batch["input_ids"].cpu().numpy()
        mask = np.pad(batch["sel"].cpu().numpy(), ((0, 0), (1, 0)))  # a row's first token never carries loss
        prompts = prompts_of(ids, batch["position_ids"].cpu().numpy(), mask)
        module = model.module if hasattr(model, "module") else model
        seeds = [[sample_seed(self.seed, epoch, index, self.rank, i)] for i in range(len(prompts))]
        with whole_student(model, self.skeleton) as student:  # FSDP: a collective, entered by every rank alike
            if op.get("sampler") == "vllm":
                out = self._vllm_sample(student, prompts, seeds)
            else:
                out = sample(student, prompts, seeds, temperature=op["temperature"], top_p=1.0,
                             max_new_tokens=op["max_new_tokens"], eos_ids=op["eos_ids"], k=1, pad_id=op["pad_id"],
                             vocab_limit=op.get("vocab_limit")) if prompts else []
        rows = completion_rows(prompts, [s[0]["tokens"] for s in out], op["max_len"], op["pad_id"])
        tokens = sampled_tokens(rows)
        t0 = time.perf_counter()
        scores = self._score(rows)
        spent = time.perf_counter() - t0
        t_ids, t_lps, _, nll = ensemble_scores(scores, op["ensemble"], self.k, op["vocab_size"], tokens)
        device = next(module.parameters()).device
        sel = torch.from_numpy(targets(rows)).to(device)
        x, pos = (torch.from_numpy(rows[:, i]).long().to(device) for i in (0, 1))
        logits = sampled_logits(model, module, x, pos, sel)  # [N, V], through DDP
        loss = self.loss_fn(logits, torch.from_numpy(t_ids).to(device), torch.from_numpy(t_lps).to(device))
        c = self.counters
        c["tokens"], c["nll_sum"], c["score_s"] = c["tokens"] + len(tokens), c["nll_sum"] + nll * len(tokens), c["score_s"] + spent
        self.m["score_latency"].observe(spent, tags=self.tags)
        self.m["sample_nll"].set(nll, tags=self.tags)
        self.m["tokens"].inc(len(tokens), tags=self.tags)
        return loss, len(tokens)

    def _vllm_sample(self, student, prompts: list, seeds: list) -> list:
        """train.on_policy.sampler vllm: the engine (built at the first on-policy batch, on every
        rank alike: joining the ranks' group is a collective) gets the current weights, then samples."""
        from orchestrator.vllm_sampler import VLLMSampler

        op = self.op
        if self.vllm is None:
            self.vllm = VLLMSampler(student.config, op["max_len"], op["max_new_tokens"], op.get("engine"),
                                    local_rank=self.ctx.get_local_rank())
        if not prompts:
            return []
        self.vllm.sync(student.state_dict().items())
        return self.vllm.sample(prompts, seeds, temperature=op["temperature"], max_new_tokens=op["max_new_tokens"],
                                eos_ids=op["eos_ids"], vocab_limit=op.get("vocab_limit"))

    def _score(self, rows: np.ndarray) -> dict[str, tuple]:
        """Every teacher's (top-k ids, log-probs, NLL) of the rows' sampled positions, all teachers
        asked at once, in chunks of at most the teacher's Serve batch; a request lost with its
        replica is sent again, as the labeler does (teachers are pure: same answer)."""
        from actors.labeler import answer

        pending = {n: [(rows[i:i + c], h.score_batched.remote(rows[i:i + c])) for i in range(0, len(rows), c)]
                   for n, h in self.handles.items() for c in [self.op["chunk"][n]]}
        out = {}
        for name, parts in pending.items():
            answers = [answer(name, response, lambda c=chunk, n=name: self.handles[n].score_batched.remote(c),
                              lost="on-policy request", what=" an on-policy batch") for chunk, response in parts]
            out[name] = tuple(np.concatenate(p) for p in zip(*answers))
        return out

    def checkpoint(self, partial: dict) -> None:
        """A mid-epoch checkpoint keeps every rank's counters of the epoch (a collective)."""
        if self.op:
            partial["on_policy"] = self._gather(self.counters)

    def resume(self, partial: dict) -> None:
        if self.op and "on_policy" in partial:
            self.counters = partial["on_policy"][self.rank]

    def _gather(self, obj) -> list:
        out = [None] * self.ctx.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out

    def epoch_metrics(self) -> dict:
        """This epoch's on-policy figures over every rank (a collective: every rank calls it), for
        the train history ({} when inert); the counters start afresh."""
        if not self.op:
            return {}
        every = self._gather(self.counters)
        self.counters = self.fresh()
        tokens = sum(c["tokens"] for c in every)
        on = sum(c["on_policy"] for c in every)
        return {"on_policy_fraction": every[0]["on_policy"] / max(every[0]["batches"], 1),
                "on_policy_tokens": tokens,
                "on_policy_sample_nll": sum(c["nll_sum"] for c in every) / tokens if tokens else None,
                "on_policy_score_s": sum(c["score_s"] for c in every) / on if on else None}
