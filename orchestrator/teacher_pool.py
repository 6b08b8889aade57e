"""The Serve teachers one process deploys, shared by its stages while a `hold` is open.

Each stage (labeling, on-policy training, evaluation's held-out scores and
teacher_nll_of_samples) deploys the teachers it needs through `deploy` and hands them back
through `release`. Without a hold that is serve deploy / delete, as before: a stage run alone
(`distill label`, `distill train`, `distill eval`) deploys what it needs and shuts it down.

Inside `hold(...)` a teacher deployed by one stage is reused by the next (same teacher config,
task and k: one Serve application per teacher, as actors/teacher.app_name names it) and every
application the hold deployed is shut down once, when the hold ends, also on failure.
Teachers attached through `serve_app` never pass through here: they stay running.

`pipeline.run` holds the teachers across stages only where the run needs them in the middle
(train.on_policy: `plan`); an offline run shuts them down after labeling, so the student's
training gets the GPUs, and deploys them again at evaluation when it needs them.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

log = logging.getLogger("distill")

# The open hold of this process: {"apps": {teacher: application}, "specs": {teacher: what was
# deployed}}, or None (no hold: deploy / release are plain deploy / shutdown).
_held: dict | None = None


@contextmanager
def for_run(cfg):
    """pipeline.run's stages inside: one hold across them where `plan` says so, and its line logged."""
    keep, why = plan(cfg)
    if not keep:
        if why:
            log.info("%s", why)
        yield
        return
    with hold(why):
        yield


def plan(cfg) -> tuple[bool, str | None]:
    """-> (whether pipeline.run keeps the teachers up across stages, the log line naming the
    setting behind that; None when no stage after labeling needs them)."""
    instruct = cfg.task == "lm" and cfg.dataset.format in ("prompt_response", "chat")
    sample_eval = instruct and cfg.eval.sample_max_new_tokens > 0
    if cfg.train.on_policy is None:
        if sample_eval:
            return False, ("teachers: shut down after labeling and deployed again at evaluation for "
                           "teacher_nll_of_samples (eval.sample_max_new_tokens > 0): train.on_policy is unset, "
                           "so the student trains without them and gets their GPUs")
        return False, None
    if cfg.eval.baseline:
        return True, ("teachers stay up from labeling through the on-policy student's training "
                      "(train.on_policy needs them); eval.baseline: shut down before the hard-label "
                      "baseline trains, deployed again at evaluation where it needs them")
    return True, "teachers stay up from labeling through evaluation: train.on_policy needs them"


@contextmanager
def hold(why: str | None = None):
    """Teachers deployed while the block runs stay up until it ends, then are shut down (also on
    failure). A hold inside an open one adds nothing (the outer one shuts down)."""
    global _held
    if _held is not None:
        yield
        return
    if why:
        log.info("%s", why)
    _held = {"apps": {}, "specs": {}}
    try:
        yield
    finally:
        end()


def end(why: str | None = None) -> None:
    """Shut down what the open hold deployed and close it (later stages deploy for themselves)."""
    global _held
    held, _held = _held, None
    if held and held["apps"]:
        from actors import teacher as serve_teachers

        serve_teachers.shutdown(held["apps"])
        log.info("teachers shut down (%s)%s", ", ".join(held["apps"].values()), f": {why}" if why else "")


def deploy(run: str, teachers: list[dict], task: str, k: int) -> dict[str, str]:
    """actors/teacher.deploy, reusing the applications the open hold has up already."""
    from actors import teacher as serve_teachers

    if _held is None:
        return serve_teachers.deploy(run, teachers, task, k)
    specs = {t["name"]: (run, task, k, t) for t in teachers}
    new = [t for t in teachers if _held["specs"].get(t["name"]) != specs[t["name"]]]
    if reused := [t["name"] for t in teachers if t not in new]:
        log.info("teachers: %s already up, reused", ", ".join(reused))
    _held["apps"].update(serve_teachers.deploy(run, new, task, k))
    _held["specs"].update({t["name"]: specs[t["name"]] for t in new})
    return {t["name"]: _held["apps"][t["name"]] for t in teachers}


def release(owned: dict[str, str]) -> bool:
    """Hand back what `deploy` gave: shut down now without a hold (-> True), else kept for the
    hold's next stage (-> False)."""
    if _held is not None:
        return False
    from actors import teacher as serve_teachers

    serve_teachers.shutdown(owned)
    return bool(owned)
