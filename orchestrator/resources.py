"""Does each stage's request for CPUs and GPUs fit the cluster? Checked once, before labeling.

Ray queues a request it cannot place until the resources appear. An embedded local Ray never
gets more, so a run that asks for more than it has waits for ever, without an error (Serve
warns once per deployment, Ray Train and a task not at all). What each stage holds at once:

  label     every teacher's replicas (teachers[].replicas x num_cpus, num_gpus); with
            label.executor ray_data also its labeler actors (label.concurrency x label.num_cpus;
            `auto` picks ray_data only on several nodes, a cluster, where this is a warning anyway)
  train     train.workers x (train.cpus_per_worker CPUs, 1 GPU with train.use_gpu); with
            train.on_policy the teachers stay up beside them
  evaluate  one student task (1 CPU, 1 GPU with train.use_gpu), then the teachers; with
            train.on_policy the teachers are up already: both at once

Teachers attached with `serve_app` run elsewhere and are not counted. Only CPU and GPU are
checked (custom resources and memory are the user's placement). On an embedded Ray a shortfall
is refused in one line (exit 2, before anything is labeled); on a cluster it is logged, since an
autoscaler may add nodes.
"""
from __future__ import annotations

import logging
import os

from .errors import DistillError

log = logging.getLogger("distill")
KINDS = ("CPU", "GPU")


def stage_needs(cfg) -> dict[str, tuple[dict[str, float], str]]:
    """{stage: ({CPU, GPU} held at once, the settings that decide it)}."""
    t = cfg.train
    own = [x for x in cfg.teachers if not x.serve_app]
    teachers = {"CPU": sum(x.replicas * x.num_cpus for x in own), "GPU": sum(x.replicas * x.num_gpus for x in own)}
    workers = {"CPU": t.workers * t.cpus_per_worker, "GPU": float(t.workers) if t.use_gpu else 0.0}
    task = {"CPU": 1.0, "GPU": 1.0 if t.use_gpu else 0.0}
    both = lambda a, b: {k: a[k] + b[k] for k in KINDS}  # noqa: E731
    held = t.on_policy is not None
    why_t = "teachers[].replicas x num_cpus / num_gpus"
    label = (teachers, why_t)
    if cfg.label.executor == "ray_data":  # its actor pool starts whole (a fixed size) or waits
        actors = {"CPU": cfg.label.concurrency * cfg.label.num_cpus, "GPU": 0.0}
        label = (both(teachers, actors), f"{why_t}, and label.concurrency x label.num_cpus for the ray_data labelers")
    return {
        "label": label,
        "train": (both(workers, teachers), f"train.workers x cpus_per_worker / use_gpu, beside the teachers "
                                           f"(train.on_policy keeps them up: {why_t})")
        if held else (workers, "train.workers x cpus_per_worker / use_gpu"),
        "evaluate": (both(task, teachers), f"a student task (1 CPU, 1 GPU with train.use_gpu) beside the teachers "
                                           f"(train.on_policy keeps them up: {why_t})")
        if held else ({k: max(task[k], teachers[k]) for k in KINDS}, f"a student task, then {why_t}"),
    }


def shortfalls(cfg, total: dict[str, float], stages=("label", "train", "evaluate")) -> list[str]:
    """Pure: one sentence per stage and resource kind that asks for more than `total` holds."""
    out = []
    for stage, (need, why) in stage_needs(cfg).items():
        if stage not in stages:
            continue
        for kind in KINDS:
            if need[kind] > total.get(kind, 0.0) + 1e-9:
                out.append(f"{stage} holds {need[kind]:g} {kind} at once ({why}) and the cluster has "
                           f"{total.get(kind, 0.0):g}")
    return out


def check(cfg, stages=("label", "train", "evaluate")) -> None:
    """In a Ray session: refuse (embedded Ray) or log (a cluster) the `stages` it cannot place."""
    import ray

    total = ray.cluster_resources()
    problems = shortfalls(cfg, total, stages)
    if not problems:
        return
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        for p in problems:
            log.warning("resources: %s; it waits until the cluster grows (an autoscaler) or for ever", p)
        return
    raise DistillError(f"resources: {problems[0]} (embedded Ray: ray.num_cpus, and the GPUs this machine has); "
                       "it would wait for ever: ask for less, or raise ray.num_cpus")
