"""distill_* metrics of the driver (prometheus_client): stages, labeling progress, store, eval.

Served on ``metrics.port`` while a command runs, and for ``metrics.linger_s`` afterwards so a
last scrape sees the evaluation results. The Ray actors' metrics (teachers, labelers, train
workers) go through Ray's own exporter: see actors/metrics.py. No Ray here.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from .errors import DistillError

log = logging.getLogger("distill")

REGISTRY = CollectorRegistry()
STAGE_SECONDS = Gauge("distill_stage_seconds", "Wall time of each finished stage.", ["run", "stage"], registry=REGISTRY)
LABEL_ROWS_PER_S = Gauge("distill_label_rows_per_second", "Labeling throughput so far.", ["run"], registry=REGISTRY)
LABEL_PROGRESS = Gauge("distill_label_progress_ratio", "Fraction of the rows to label that are stored.", ["run"],
                       registry=REGISTRY)
LABEL_ETA = Gauge("distill_label_eta_seconds", "Estimated seconds of labeling left.", ["run"], registry=REGISTRY)
BYTES_PER_TOKEN = Gauge("distill_store_bytes_per_token", "Stored label bytes per token position (LM stores).",
                        ["run", "teacher"], registry=REGISTRY)
EVAL_ACCURACY = Gauge("distill_eval_accuracy", "Held-out accuracy (top-1 next token for LMs).", ["run", "model"],
                      registry=REGISTRY)
GENERATE_TOKENS_PER_S = Gauge("distill_generate_tokens_per_second",
                              "distill generate: tokens per second of each teacher so far (request to answer).",
                              ["run", "teacher"], registry=REGISTRY)
EVAL_SAMPLE_NLL = Gauge("distill_eval_teacher_nll_of_samples",
                        "Teacher ensemble's NLL per token of a student's own answers to the held-out prompts.",
                        ["run", "model"], registry=REGISTRY)
EVAL_NLL = Gauge("distill_eval_nll", "Held-out negative log-likelihood (nats; exp() is perplexity).", ["run", "model"],
                 registry=REGISTRY)


@contextmanager
def endpoint(port: int | None, linger_s: float = 0.0):
    """Serve REGISTRY on 0.0.0.0:port for the duration (no-op when port is None)."""
    if port is None:
        yield
        return
    try:
        server, thread = start_http_server(port, registry=REGISTRY)
    except OSError as e:
        raise DistillError(f"metrics.port: cannot serve metrics on port {port} ({e.strerror}); "
                           "pick a free port or leave metrics.port unset") from None
    log.info("metrics: driver metrics on :%d/metrics (metrics.port)", port)
    try:
        yield
        if linger_s > 0:  # after a success only: a failed command should exit at once
            log.info("metrics: keeping the endpoint up %.0fs for a last scrape (metrics.linger_s)", linger_s)
            time.sleep(linger_s)
    finally:
        server.shutdown()
        thread.join(timeout=5)


@contextmanager
def stage(run: str, name: str, timings: dict):
    """Time a stage into timings[name] and distill_stage_seconds."""
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0
    STAGE_SECONDS.labels(run, name).set(timings[name])


def label_progress(run: str, done: int, total: int, rate: float) -> None:
    LABEL_ROWS_PER_S.labels(run).set(rate)
    LABEL_PROGRESS.labels(run).set(done / max(total, 1))
    LABEL_ETA.labels(run).set((total - done) / rate if rate > 0 else 0.0)


def store_summary(run: str, bytes_per_token: dict[str, float] | None) -> None:
    for teacher, value in (bytes_per_token or {}).items():
        BYTES_PER_TOKEN.labels(run, teacher).set(value)


def eval_results(run: str, models: dict[str, dict]) -> None:
    for name, m in models.items():
        if m.get("accuracy") is not None:
            EVAL_ACCURACY.labels(run, name).set(m["accuracy"])
        if m.get("nll") is not None:
            EVAL_NLL.labels(run, name).set(m["nll"])
        if m.get("teacher_nll_of_samples") is not None:
            EVAL_SAMPLE_NLL.labels(run, name).set(m["teacher_nll_of_samples"])


def generate_rate(run: str, teacher: str, tokens_per_s: float) -> None:
    GENERATE_TOKENS_PER_S.labels(run, teacher).set(tokens_per_s)
