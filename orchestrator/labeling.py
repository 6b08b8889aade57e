"""Stage 1+2, deploy and label: Serve teachers -> a Labeler per shard (driver threads, or a Ray
Data actor pool) -> store shards, skipping finished ones. Also `--reensemble`, which recomputes
the soft labels from the stored teacher outputs without any teacher (and without Ray)."""
from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from . import metrics
from .config import DistillConfig
from .datasets import features_of
from .errors import DistillError
from .instruct import rows_of
from .prepare import Prepared
from .session import reraise_user_error
from .soft_labels import build_shard, stored_outputs
from .store import LabelStore, open_store, to_numpy

log = logging.getLogger("distill")


def label(cfg: DistillConfig, prep: Prepared, reensemble: bool = False) -> LabelStore:
    store = open_store(cfg.store_path)
    if store.exists():
        store.check_identity(prep.identity)
        if reensemble:
            return reensemble_store(store, prep.ensemble)
        if store.manifest.get("ensemble") != prep.ensemble:
            raise DistillError(
                f"store {store.uri}: ensemble settings differ from the store's "
                f"({dict_diff(store.manifest.get('ensemble', {}), prep.ensemble)}); "
                "run `distill label --reensemble` to recompute the soft labels without the teachers"
            )
        missing = store.record_finished()
        if not missing:
            log.info("label: store %s is complete (%d shards): no teacher work", store.uri, store.num_shards)
            return store
    elif reensemble:
        raise DistillError(f"store {store.uri} does not exist: run `distill label` first")
    else:
        store.ensure_writable()  # an unreachable store.path fails here, before any teacher is deployed
        missing = None

    from actors import teacher as serve_teachers

    from . import teacher_pool

    teachers = {t.name: t.model_dump() for t in cfg.teachers}
    order = [t["name"] for t in prep.identity["teachers"]]  # the store's one teacher order
    # Teachers with `serve_app` are already running (a RayService, say): use them, leave them up.
    apps = serve_teachers.attach([t for t in teachers.values() if t["serve_app"]])
    # Deployed here, or still up from an earlier stage of this process (orchestrator/teacher_pool.py).
    owned = teacher_pool.deploy(cfg.run.name, [t for t in teachers.values() if not t["serve_app"]], cfg.task, cfg.lm.k)
    apps = {n: {**apps, **owned}[n] for n in order}
    try:
        try:
            infos = serve_teachers.probe(apps, _first_input(prep.train))
        except Exception as e:  # a teacher that cannot take the data (wrong width...): one line
            reraise_user_error(e)
        _check_fingerprints(infos, prep.identity["teachers"], apps)
        num_classes = _check_teachers(infos, prep.train)
        if missing is None:  # a new store: written only once the teachers are known to be sound
            extra = {"lm": {"vocab_size": num_classes, "max_len": cfg.lm.max_len}} if cfg.task == "lm" else {}
            store.create({**prep.identity, "ensemble": prep.ensemble, "num_classes": num_classes, **extra}, prep.train)
            missing = list(range(store.num_shards))
        label_shards(cfg, store, apps, missing)
        if cfg.task == "lm":  # while the teachers are up: their held-out scores, for evaluation
            from .evaluation import missing_scores, score_teachers

            score_teachers(cfg, prep, {n: apps[n] for n in missing_scores(cfg, prep)})
    finally:
        teacher_pool.release(owned)  # shut down now, or kept up for a later stage (a hold)
    missing = store.record_finished()
    metrics.store_summary(cfg.run.name, store.bytes_per_token())
    if missing:
        raise DistillError(f"store {store.uri}: labeling ended with {store.describe_missing(missing)}; re-run to resume")
    return store


def _check_fingerprints(infos: dict[str, dict], expected: list[dict], apps: dict[str, str]) -> None:
    """What is served must be what the config names: labels are only as good as that link."""
    for t in expected:
        served = infos[t["name"]]["fingerprint"]
        if served != t["fingerprint"]:
            raise DistillError(f"teacher '{t['name']}': Serve application '{apps[t['name']]}' serves other weights "
                               f"(fingerprint {served}) than teachers[].path ({t['fingerprint']})")


def _first_input(train: pa.Table) -> np.ndarray:
    return rows_of(train.slice(0, 1)) if "input_ids" in train.column_names else features_of(train)[:1]


def _check_teachers(infos: dict[str, dict], train: pa.Table) -> int:
    """Teachers must agree on their output width (classes) -> that width. LM teachers share one
    tokenizer (prepare.check_vocabulary) but may differ in padding rows past it
    (vocab.ensemble_vocab): the widest is the ensemble's vocabulary, and every teacher must
    read every token of the data."""
    lm = "input_ids" in train.column_names
    what = "vocabulary size" if lm else "number of classes"
    widths = {n: i["num_classes"] for n, i in infos.items()}
    if len(set(widths.values())) != 1 and not lm:
        raise DistillError(f"teachers disagree on the {what}: " + ", ".join(f"'{n}' has {w}" for n, w in widths.items())
                           + "; one ensemble needs teachers of the same label space (remove or fix the odd one)")
    narrowest = min(widths, key=widths.get)
    top = int(np.max(to_numpy(train.column("input_ids")) if lm else train.column("label").to_numpy()))
    if top >= widths[narrowest]:
        field = "token id" if lm else "dataset.label: class id"
        who = f"teacher '{narrowest}' {what}" if lm and len(set(widths.values())) > 1 else f"teachers' {what}"
        raise DistillError(f"{field} {top} found, but the {who} is {widths[narrowest]}")
    return max(widths.values())


def label_shards(cfg: DistillConfig, store: LabelStore, apps: dict[str, str], shards: list[int]) -> None:
    chunk = {t.name: t.max_batch_size for t in cfg.teachers}
    labeler_args = {"store_uri": store.uri, "apps": apps, "chunk": chunk, "run": cfg.run.name}
    executor = label_executor(cfg)
    results = (_label_in_driver if executor == "driver" else _label_with_ray_data)(cfg, labeler_args, shards)
    t0, rows, total = time.perf_counter(), 0, store.manifest["dataset"]["rows"]
    todo = sum(min(store.manifest["shard_size"], total - s * store.manifest["shard_size"]) for s in shards)
    # A failing shard is re-raised below as one line; Ray Data's own ERROR narration would repeat it.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    try:
        for n, out in enumerate(results, 1):
            rows += int(out["rows"])
            rate = rows / (time.perf_counter() - t0)
            metrics.label_progress(cfg.run.name, rows, todo, rate)
            log.info("label: shard %d/%d, %d/%d rows, %.0f rows/s, ETA %.0fs, teacher disagreement %.3f",
                     n, len(shards), rows, todo, rate, (todo - rows) / rate, out["disagreement"])
    except Exception as e:  # a teacher returning NaN, a wrong shape...: the user's problem, one line
        reraise_user_error(e)
    finally:
        results.close()  # the driver executor: cancel shards not yet started
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def label_executor(cfg: DistillConfig) -> str:
    import ray

    if cfg.label.executor != "auto":
        log.info("label: executor %s (label.executor)", cfg.label.executor)
        return cfg.label.executor
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    executor = "driver" if nodes == 1 else "ray_data"
    log.info("label: executor %s (label.executor=auto, %d node%s; set label.executor to choose)",
             executor, nodes, "" if nodes == 1 else "s")
    return executor


def _label_in_driver(cfg: DistillConfig, labeler_args: dict, shards: list[int]):
    """One Labeler in this process, label.concurrency shards in flight on threads.

    The threads mostly wait on Serve; numpy, torch and pyarrow release the GIL for the rest.
    No labeler processes to start (each costs ~2 CPU-seconds of imports), which on one node is
    most of Ray Data's overhead (BENCHMARKS.md, label_vs_direct). Yields each shard's summary
    as it finishes; a lost replica is retried inside the Labeler, as on the Ray Data path.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from actors.labeler import Labeler

    labeler = Labeler(**labeler_args)
    with ThreadPoolExecutor(max_workers=cfg.label.concurrency, thread_name_prefix="labeler") as pool:
        futures = [pool.submit(labeler.label_shard, s) for s in shards]
        try:
            for f in as_completed(futures):
                yield f.result()
        finally:  # an error (or the caller giving up): start no further shard
            for f in futures:
                f.cancel()


def _label_with_ray_data(cfg: DistillConfig, labeler_args: dict, shards: list[int]):
    """A Ray Data actor pool of label.concurrency Labelers (any node), one shard per call."""
    import ray.data

    from actors.labeler import Labeler

    # A shard that fails must fail the run loudly, never be skipped: Ray Data may drop up to
    # max_errored_blocks failing blocks and carry on. Lost replicas are retried in the labeler,
    # and a Labeler actor lost with its node is restarted by Ray Data (its tasks are retried).
    ray.data.DataContext.get_current().max_errored_blocks = 0
    ds = ray.data.from_items([{"shard": s} for s in shards]).map_batches(
        Labeler,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(cfg.label.concurrency, len(shards))),
        fn_constructor_kwargs=labeler_args,
        num_cpus=cfg.label.num_cpus,
    )
    yield from ds.iter_rows()


def reensemble_store(store: LabelStore, ensemble: dict) -> LabelStore:
    """Recompute the soft labels of every shard from the stored teacher outputs (no teacher).

    Crash-safe: the new shards are written as a new generation of files beside the old ones,
    and one manifest write switches the store over. Killed before that, the store is still
    the old one, whole; killed after, the new one.
    """
    if missing := store.record_finished():
        raise DistillError(f"store {store.uri} is not fully labeled: {store.describe_missing(missing)}; "
                           "run `distill label` before --reensemble")
    generation, manifest = store.generation + 1, {**store.manifest, "ensemble": ensemble}
    for i in range(store.num_shards):
        inputs, outputs = stored_outputs(store.read_shard(i), manifest)
        store.write_shard(i, build_shard(inputs, outputs, manifest)[0], generation)
    store.switch_generation(generation, ensemble)
    log.info("label: re-ensembled %d shards as %s", store.num_shards, ensemble)
    return store


def dict_diff(have: dict, want: dict) -> str:
    return ", ".join(f"{k}: store {have.get(k)!r} vs config {want.get(k)!r}"
                     for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k))
