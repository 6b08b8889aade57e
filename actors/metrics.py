"""distill_* metrics recorded inside Ray actors (ray.util.metrics).

Ray exports them on every node's metrics port (the port in the service-discovery file Ray
writes on the head, what KubeRay's PodMonitor scrapes) with its own prefix: ``ray_distill_*``.
cluster/prometheus/prometheus.yml renames them back to ``distill_*`` on scrape, so the driver's
metrics and the actors' share one namespace in Prometheus and in the Grafana dashboard.

Each actor creates its metrics once (the lru_cache); tags: run, teacher, student.
"""
from __future__ import annotations

from functools import lru_cache

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


@lru_cache(maxsize=None)
def teacher() -> dict:
    tags = ("run", "teacher")
    return {
        "requests": Counter("distill_teacher_requests", "Requests answered by a teacher replica.", tags),
        "rows": Counter("distill_teacher_rows", "Rows (samples or windows) a teacher replica labeled.", tags),
        "latency": Histogram("distill_teacher_latency_seconds", "Forward time of one batched teacher call.",
                             LATENCY_BUCKETS, tags),
        # distill generate: tokens a replica wrote, and its rate over its last generate call
        "generated_tokens": Counter("distill_teacher_generated_tokens", "Tokens a teacher replica generated.", tags),
        "generate_tokens_per_s": Gauge("distill_teacher_generate_tokens_per_second",
                                       "Generated tokens per second of a replica's last generate call.", tags),
    }


@lru_cache(maxsize=None)
def labeler() -> dict:
    tags = ("run",)
    return {
        "samples": Counter("distill_samples_labeled", "Samples written to the store with their labels.", tags),
        "tokens": Counter("distill_tokens_labeled", "Token positions labeled (causal-LM stores).", tags),
        "bytes": Counter("distill_store_bytes_written", "Bytes of label shards written to the store.", tags),
        "disagreement": Gauge("distill_teacher_disagreement", "Mean JSD between the teachers, last shard.", tags),
        "tail_mass": Gauge("distill_topk_tail_mass", "Mean top-k tail mass of the ensemble, last shard.", tags),
    }


@lru_cache(maxsize=None)
def trainer() -> dict:
    tags = ("run", "student")
    return {
        "loss": Gauge("distill_train_loss", "Training objective, mean over the last logging window.", tags),
        "kd_loss": Gauge("distill_train_kd_loss", "Soft-target (distillation) term of the objective.", tags),
        "samples_per_s": Gauge("distill_train_samples_per_second", "Samples (tokens for LMs) per second, one worker.",
                               (*tags, "rank")),
        "step": Gauge("distill_train_step", "Optimiser steps taken.", tags),
        "epoch": Gauge("distill_train_epoch", "Epochs finished.", tags),
    }


@lru_cache(maxsize=None)
def on_policy() -> dict:
    """train.on_policy (actors/on_policy.py), per train worker."""
    tags = ("run", "student", "rank")
    return {
        "fraction": Gauge("distill_onpolicy_fraction", "Fraction of this epoch's batches trained on-policy so far.", tags),
        "score_latency": Histogram("distill_onpolicy_score_seconds", "Teachers' scoring of one on-policy batch "
                                   "(every teacher, through Serve, retries included).", LATENCY_BUCKETS, tags),
        "sample_nll": Gauge("distill_onpolicy_sample_nll", "The teacher ensemble's NLL per token of the student's "
                            "samples, last on-policy batch.", tags),
        "tokens": Counter("distill_onpolicy_tokens", "Tokens the student sampled in on-policy batches.", tags),
    }
