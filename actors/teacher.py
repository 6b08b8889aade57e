"""Teachers as Ray Serve deployments: one application per teacher, dynamic batching by rows.

Health under long forward passes: the model runs on its own thread (not on the replica's user
event loop), and the health check never waits for the model: it answers from the verdict of the
last probe and queues a new probe only when the model is idle. A replica is restarted when its
model gives non-finite outputs on the probe row, never because it is busy.
"""
from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from ray import serve

from orchestrator.errors import DistillError
from orchestrator.instruct import targets
from orchestrator.features import features_of_output, logits_of, split_output
from orchestrator.lm_features import arrays, split_answer


# A stopping replica checks for requests in flight this often (Serve's 2 s default was the least
# any replica took to stop); it still waits for them, up to Serve's graceful_shutdown_timeout_s.
DRAIN_POLL_S = 0.1


def app_name(run: str, teacher: str) -> str:
    return f"distill-{run}-{teacher}"


@serve.deployment(max_ongoing_requests=64)
class Teacher:
    def __init__(self, cfg: dict, task: str = "classification", k: int = 8, run: str = "service"):
        from actors import metrics

        self.cfg = cfg
        self.metrics, self.tags = metrics.teacher(), {"run": run, "teacher": cfg["name"]}
        _log_to_stderr()
        # Every model call (the load included) runs on this one thread, never on Serve's event
        # loop (a long forward pass there blocks the health check) nor on Serve's request threads:
        # - one call at a time: vLLM's engine is not safe to call concurrently (seen: "dictionary
        #   changed size during iteration" when the health check ran during the probe);
        # - one thread: OpenMP thread counts are per thread, and vLLM's CPU attention checks that
        #   the forward pass runs with its load-time count (seen on a pool thread:
        #   "cpu_attn_impl.hpp: Check failed: input->metadata->thread_num == thread_num (2 vs. 1)").
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"teacher-{cfg['name']}")
        self._calls, self._calls_lock = 0, threading.Lock()  # model calls submitted and not yet finished
        self.model = self._call(self._load, cfg, task, k).result()
        self.probe: np.ndarray | None = None  # one real input row, set by info()
        self._sick: str | None = None  # why the last probe failed; None: healthy
        # Batches are measured in rows (a request is a [rows, D] array), not in requests.
        self.predict.set_max_batch_size(cfg["max_batch_size"])
        self.predict.set_batch_wait_timeout_s(cfg["batch_wait_timeout_s"])
        self.score_batched.set_max_batch_size(cfg["max_batch_size"])  # on-policy scoring: the same batches
        self.score_batched.set_batch_wait_timeout_s(cfg["batch_wait_timeout_s"])

    @staticmethod
    def _load(cfg: dict, task: str, k: int):
        import torch

        from orchestrator.models import load_teacher

        torch.set_num_threads(max(1, int(cfg.get("num_cpus") or 1)))  # of this (the model) thread
        return load_teacher(cfg, task, k)

    def _call(self, fn, *args) -> Future:
        """Queue fn(*args) on the model thread."""
        with self._calls_lock:  # callers: the event loop and Serve's threads
            self._calls += 1
        future = self._model_thread.submit(fn, *args)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _: Future) -> None:
        with self._calls_lock:
            self._calls -= 1

    def info(self, sample: np.ndarray) -> dict:
        """Output width on a real input row (mismatched teachers are caught before labeling),
        the fingerprint of the weights this replica serves, and where it runs."""
        import ray

        from orchestrator.models import teacher_fingerprint

        self.probe = sample[:1]
        out = self._call(self._forward, self.probe).result()
        feats = {k: list(v.shape[1:]) for k, v in features_of_output(out).items()}  # teachers[].features
        out = logits_of(out)
        width = getattr(self.model, "vocab_size", None) if isinstance(out, tuple) else out.shape[-1]
        return {"name": self.cfg["name"], "num_classes": int(width), **({"features": feats} if feats else {}),
                "fingerprint": teacher_fingerprint(self.cfg), "node_id": ray.get_runtime_context().get_node_id(),
                "engine": getattr(self.model, "engine_settings", None)}  # vllm: each setting and why

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005, batch_size_fn=lambda xs: sum(len(x) for x in xs))
    async def predict(self, batches: list[np.ndarray]) -> list:
        """[rows_i, ...] arrays from many callers -> one forward pass -> each caller's rows.

        Classifiers return logits [rows, C] (with teachers[].features: {"logits", "features"});
        causal LMs a tuple (top-k ids, logprobs), + {LAYER: float16 features} with teachers[].features.
        """
        t0 = time.perf_counter()
        x = np.concatenate(batches)
        out = await asyncio.wrap_future(self._call(self._forward, x))  # the event loop stays free meanwhile
        self.metrics["latency"].observe(time.perf_counter() - t0, tags=self.tags)
        self.metrics["requests"].inc(len(batches), tags=self.tags)
        self.metrics["rows"].inc(len(x), tags=self.tags)
        cuts = np.cumsum([len(b) for b in batches])[:-1]
        if isinstance(out, tuple):  # LM: packed rows answer for their loss positions only
            pos_cuts = np.cumsum(targets(x).sum(axis=1))[cuts - 1] if x.ndim == 3 else cuts
            return split_answer(out, cuts, pos_cuts, self.cfg.get("pool") == "none")
        return split_output(out, cuts)

    @property
    def _forward(self):
        """The model call predict serves: with teachers[].features, logits + features in one pass."""
        return self.model.forward_features if self.cfg.get("features") else self.model

    async def score(self, rows: np.ndarray) -> tuple:
        """Held-out evaluation of an LM teacher, as served: (top-k ids, log-probs, true-token NLL)
        for the rows' positions that carry loss. Not batched across callers: the evaluator
        sends its own batches."""
        t0 = time.perf_counter()
        out = await asyncio.wrap_future(self._call(self.model.score, rows))
        self.metrics["latency"].observe(time.perf_counter() - t0, tags=self.tags)
        return out

    async def generate(self, prompts: list[list[int]], seeds: list[list[int]], options: dict) -> list:
        """`distill generate`: per prompt (token ids), len(seeds[p]) sampled responses with this
        teacher's own top-k log-probs per generated token (orchestrator/generation.py). Not
        batched across callers: a caller's block of prompts is one batch, so a re-run samples
        in the same batches and gets the same tokens."""
        from orchestrator.generation import generate_with

        t0 = time.perf_counter()
        out = await asyncio.wrap_future(self._call(generate_with, self.model, prompts, seeds, options))
        seconds = time.perf_counter() - t0
        self.metrics["latency"].observe(seconds, tags=self.tags)
        tokens = sum(len(s["tokens"]) for per_prompt in out for s in per_prompt)
        self.metrics["generated_tokens"].inc(tokens, tags=self.tags)
        self.metrics["generate_tokens_per_s"].set(tokens / max(seconds, 1e-9), tags=self.tags)
        return out

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005, batch_size_fn=lambda xs: sum(len(x) for x in xs))
    async def score_batched(self, batches: list[np.ndarray]) -> list:
        """On-policy training (actors/on_policy.py): `score` of packed rows [rows_i, 3, L] from
        every train worker, batched as predict batches them -> each caller's (top-k ids, log-probs,
        NLL) at its rows' loss positions. Callers send rows of one length (lm.max_len)."""
        t0 = time.perf_counter()
        x = np.concatenate(batches)
        out = await asyncio.wrap_future(self._call(self.model.score, x))
        self.metrics["latency"].observe(time.perf_counter() - t0, tags=self.tags)
        self.metrics["requests"].inc(len(batches), tags=self.tags)
        self.metrics["rows"].inc(len(x), tags=self.tags)
        cuts = np.cumsum(targets(x).sum(axis=1))[np.cumsum([len(b) for b in batches])[:-1] - 1]
        return list(zip(*(np.split(o, cuts) for o in out)))

    def params(self) -> int:
        """Parameters of the served model (from its weight files: the same for every backend)."""
        return params_on_disk(self.cfg["path"])

    def check_health(self):
        """Called by Serve every health_check_period_s; must answer within health_check_timeout_s.

        Never waits on the model: a busy replica (a long forward pass) is healthy. When the model
        is idle, a probe on the info() row is queued on the model thread, and its verdict is what
        the next checks report: Serve restarts a replica whose model no longer produces finite
        outputs (or raises).
        """
        if self.probe is not None and self._calls == 0:
            self._call(self._probe)
        if self._sick is not None:
            raise RuntimeError(self._sick)

    def _probe(self) -> None:
        try:
            out = self._forward(self.probe)
            out = (logits_of(out), *features_of_output(out).values()) if isinstance(out, dict) else out
            finite = all(np.isfinite(o).all() for o in arrays(out))  # LM features: a dict in the tuple
            self._sick = None if finite else f"teacher '{self.cfg['name']}' produces non-finite outputs"
        except Exception as e:  # noqa: BLE001  (a model that raises on a row it took before is broken)
            self._sick = f"teacher '{self.cfg['name']}': probe failed: {type(e).__name__}: {e}"


def params_on_disk(path: str) -> int:
    """Parameters in a from_pretrained dir's safetensors files (read from their headers, no
    weights loaded; tied weights counted once, as they are stored once). 0 if there are none."""
    total = 0
    for f in sorted(pathlib.Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")
    return total


def _log_to_stderr() -> None:
    """In a replica process nothing configures our "distill" logger: send its INFO lines (the vLLM
    engine settings and why) to stderr, i.e. the replica's log file, and the driver's console
    unless the run is quiet."""
    log = logging.getLogger("distill")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def build_app(args: dict):
    """Serve config entrypoint (`import_path: actors.teacher:build_app`), e.g. for a RayService.

    ``args`` is one teacher's config as in the run YAML (name, backend, path, ...). Labeling
    jobs attach to such an application with ``teachers[].serve_app`` instead of deploying.
    """
    from orchestrator.config import TeacherConfig

    args = dict(args)
    task, k = args.pop("task", "classification"), args.pop("k", 8)  # task lm: top-k per position
    run = args.pop("run", "service")  # the `run` tag of its metrics
    cfg = TeacherConfig.model_validate(args).model_dump()
    return Teacher.options(**deployment_options(cfg)).bind(cfg, task, k, run)


def deployment_options(cfg: dict) -> dict:
    """Serve options of one teacher's deployment (a validated teachers[] entry).

    A tensor-parallel vLLM teacher (engine.tensor_parallel_size N > 1) gets a placement group per
    replica, one bundle per GPU, all on one node (STRICT_PACK: the shards talk over NVLink/PCIe).
    The replica actor itself sits in bundle 0 with its CPUs but takes no GPU: the GPUs are for
    vLLM's N Ray workers, which it starts in that placement group.
    """
    tp = (cfg.get("engine") or {}).get("tensor_parallel_size") or 1
    actor = {"num_cpus": cfg["num_cpus"], "num_gpus": cfg["num_gpus"], "resources": cfg["resources"]}
    opts = {"name": f"teacher-{cfg['name']}", "num_replicas": cfg["replicas"], "ray_actor_options": actor,
            "health_check_period_s": cfg["health_check_period_s"], "health_check_timeout_s": cfg["health_check_timeout_s"],
            "graceful_shutdown_wait_loop_s": DRAIN_POLL_S}
    if tp > 1:
        actor["num_gpus"] = 0
        opts["placement_group_bundles"] = [{"CPU": cfg["num_cpus"], "GPU": 1, **cfg["resources"]}] + [{"GPU": 1}] * (tp - 1)
        opts["placement_group_strategy"] = "STRICT_PACK"
    return opts


def deploy(run: str, teachers: list[dict], task: str = "classification", k: int = 8) -> dict[str, str]:
    """Start one Serve application per teacher, all at once; return {teacher: application}."""
    apps = {cfg["name"]: app_name(run, cfg["name"]) for cfg in teachers}
    if not apps:  # every teacher is attached to a running application
        return apps
    targets = [serve.RunTarget(build_app({**cfg, "task": task, "k": k, "run": run}), name=apps[cfg["name"]], route_prefix=None)
               for cfg in teachers]
    try:
        # Replicas and the controller log at WARNING: our own progress lines tell the story.
        serve.start(logging_config={"log_level": "WARNING"})
        serve.run_many(targets)
    except Exception as e:
        text = str(e)
        culprit = next((t for t, a in apps.items() if a in text), ", ".join(apps))
        lines = [ln for ln in text.splitlines() if ln.strip()]
        detail = next((ln for ln in reversed(lines) if "DistillError" in ln), lines[-1] if lines else repr(e))
        shutdown(apps)
        raise DistillError(f"teacher '{culprit}': deployment failed: {detail.split('DistillError: ')[-1]}") from None
    finally:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # serve.run re-arms it at INFO
    return apps


def attach(teachers: list[dict]) -> dict[str, str]:
    """{teacher: application} for teachers served by an already-running Serve application."""
    running = set(serve.status().applications)
    apps = {}
    for cfg in teachers:
        if cfg["serve_app"] not in running:
            raise DistillError(f"teacher '{cfg['name']}': no running Serve application '{cfg['serve_app']}' "
                               f"(running: {', '.join(sorted(running)) or 'none'})")
        apps[cfg["name"]] = cfg["serve_app"]
    return apps


def probe(apps: dict[str, str], sample: np.ndarray) -> dict[str, dict]:
    handles = {n: serve.get_app_handle(a) for n, a in apps.items()}
    responses = {n: h.info.remote(sample) for n, h in handles.items()}
    return {n: r.result() for n, r in responses.items()}


def shutdown(apps: dict[str, str], timeout_s: float = 60.0) -> None:
    """Delete the teachers' applications at once and wait until they are gone (a blocking
    serve.delete each took ~3 s: the replica's drain sleep, then Serve's 1 s status poll)."""
    names = set(apps.values())
    for name in names:
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while left := names & set(serve.status().applications):
        if time.monotonic() > deadline:  # warn, not raise: in a `finally` a raise would hide the real error
            return logging.getLogger("distill").warning("teachers: %s still being deleted after %.0fs",
                                                        ", ".join(sorted(left)), timeout_s)
        time.sleep(0.05)
