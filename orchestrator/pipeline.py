"""The whole data path, top-down: deploy -> label -> train -> evaluate -> report.

    run(cfg)
      prepare   load the dataset, split it, fingerprint data and teachers (no Ray)
      label     Serve teachers -> Labeler per shard (driver threads, or Ray Data map_batches) -> store
                shards (skips finished)
      train     Ray Train TorchTrainer(student.train_loop) on the store, KD and hard baseline
      evaluate  held-out scores of teachers, ensemble, students -> report.json/.md + plots
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import metrics
from .config import DistillConfig
from .datasets import features_of, fingerprint, load_dataset, load_text, pack, split_indices, token_table
from .errors import DistillError
from .models import load_tokenizer, teacher_fingerprint, tokenizer_hash
from .report import table, write_report
from .soft_labels import build_shard, stored_outputs
from .store import SCHEMA_VERSION, SOFT_COLUMN, LabelStore, to_numpy, topk_columns

log = logging.getLogger("distill")


# ---- prepare (no Ray) ---------------------------------------------------------------------


@dataclass
class Prepared:
    train: pa.Table  # canonical rows + `row`, the split that is labeled and trained on
    test: pa.Table  # held out for evaluation only
    identity: dict  # what the store must have been built from
    ensemble: dict  # mode, temperature, tau, weights per teacher


def prepare(cfg: DistillConfig) -> Prepared:
    if cfg.task == "lm":
        return _prepare_lm(cfg)
    d = cfg.dataset
    table = load_dataset(d.source, d.features, d.label, d.id_column, d.limit)
    train_idx, test_idx = split_indices(table.num_rows, d.test_fraction, d.seed)
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise DistillError(f"dataset.test_fraction: {d.test_fraction} leaves an empty split of {table.num_rows} rows")
    train = table.take(train_idx)
    train = train.append_column("row", pa.array(np.arange(train.num_rows), pa.int64()))
    teachers = _teacher_identities(cfg)
    identity = {
        "schema_version": SCHEMA_VERSION,
        "dataset": {"source": d.source, "fingerprint": fingerprint(train), "rows": train.num_rows,
                    "feature_dim": features_of(train).shape[1]},
        "teachers": teachers,
        "label_kind": "dense",
        "k": None,
        "shard_size": cfg.store.shard_size,
    }
    ensemble = _ensemble_record(cfg)
    return Prepared(train, table.take(test_idx), identity, ensemble)


def _ensemble_record(cfg: DistillConfig) -> dict:
    """The ensemble settings as the manifest records them (weights keyed by teacher)."""
    return {**cfg.ensemble.model_dump(), "weights": {t.name: t.weight for t in cfg.teachers}}


def _teacher_identities(cfg: DistillConfig) -> list[dict]:
    return [{"name": t.name, "backend": t.backend, "fingerprint": teacher_fingerprint(t.model_dump())}
            for t in cfg.teachers]


def check_vocabulary(cfg: DistillConfig) -> str:
    """One tokenizer per ensemble: every teacher's tokenizer files must hash the same.

    Returns the tokenizer directory the pipeline tokenizes with.
    """
    hashes = {t.name: tokenizer_hash(t.path) for t in cfg.teachers}
    missing = [n for n, h in hashes.items() if h is None]
    if missing and not cfg.lm.tokenizer:
        raise DistillError(f"teacher '{missing[0]}': no tokenizer files in its dir; set lm.tokenizer")
    tok_dir = cfg.lm.tokenizer or cfg.teachers[0].path
    ref = tokenizer_hash(tok_dir)
    if ref is None:
        raise DistillError(f"lm.tokenizer: no tokenizer files in {tok_dir}")
    names = [n for n, h in hashes.items() if h is not None]
    for a, b in zip(names, names[1:]):
        if hashes[a] != hashes[b]:
            raise DistillError(f"teachers '{a}' and '{b}' use different vocabularies (tokenizer files differ); "
                               "one ensemble needs one tokenizer")
    if names and hashes[names[0]] != ref:
        raise DistillError(f"lm.tokenizer {tok_dir} differs from teacher '{names[0]}' tokenizer")
    return tok_dir


def _prepare_lm(cfg: DistillConfig) -> Prepared:
    """Tokenize once with the ensemble's one tokenizer; pack into windows of lm.max_len."""
    from .models import check_lm_limits

    d = cfg.dataset
    check_lm_limits([t.model_dump() for t in cfg.teachers], cfg.lm.k, cfg.lm.max_len, cfg.lm.student_config)
    tok_dir = check_vocabulary(cfg)
    tokenizer = load_tokenizer(tok_dir)
    texts = load_text(d.source, d.text, d.limit)
    if d.test_source:
        test_texts = load_text(d.test_source, d.text)
    else:
        tr, te = split_indices(len(texts), d.test_fraction, d.seed)
        texts, test_texts = [texts[i] for i in tr], [texts[i] for i in te]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    if eos is None:
        raise DistillError(f"lm.tokenizer: {tok_dir} defines no eos (or pad) token to separate documents")

    def windows(batch: list[str]) -> pa.Table:
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        return token_table(pack(ids, cfg.lm.max_len, eos))

    train, test = windows(texts), windows(test_texts)
    train = train.append_column("row", pa.array(np.arange(train.num_rows), pa.int64()))
    identity = {
        "schema_version": SCHEMA_VERSION,
        "dataset": {"source": d.source, "fingerprint": fingerprint(train), "rows": train.num_rows,
                    "max_len": cfg.lm.max_len, "tokenizer": tokenizer_hash(tok_dir)},
        "teachers": _teacher_identities(cfg),
        "label_kind": "topk",
        "k": cfg.lm.k,
        "shard_size": cfg.store.shard_size,
    }
    ensemble = _ensemble_record(cfg)
    log.info("prepare: %d train / %d held-out windows of %d tokens (tokenizer %s)",
             train.num_rows, test.num_rows, cfg.lm.max_len, tok_dir)
    return Prepared(train, test, identity, ensemble)


# ---- Ray session ----------------------------------------------------------------------------


RAY_ENV = {
    # Ray Data's per-operator progress bars drown our own progress lines.
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # Train v2's controller collects each ray.train.report on its health-check poll (2 s by
    # default) and the worker blocks until then: with small epochs that poll was most of the
    # training time (2.2 s per epoch measured on the quickstart).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}


@contextmanager
def ray_session(cfg: DistillConfig):
    """Attach to RAY_ADDRESS / ray.address when given, else start an embedded local Ray."""
    import ray

    quiet_ray_loggers()
    if ray.is_initialized():
        yield
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    log.info("ray: %s", f"connecting to {address}" if address else "starting an embedded local Ray")
    os.environ.update(RAY_ENV)  # workers of an embedded Ray inherit the driver's environment
    # Inside a submitted job the job's runtime env (jobs/runtime_env.yaml, the RayJob's
    # runtimeEnvYAML) already carries RAY_ENV: passing another one here would replace it.
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by the job supervisor
    ray.init(address=address, num_cpus=None if address else cfg.ray.num_cpus, logging_level=logging.WARNING,
             runtime_env=None if in_job else {"env_vars": RAY_ENV},
             log_to_driver=not quiet())  # quiet: no worker output (progress lines, replica logs) either
    try:
        yield
    finally:
        # Serve caches its controller client in this process: drop it with the session we own,
        # or a second run in the same process talks to the dead controller.
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def quiet() -> bool:
    """`distill -q`: warnings and the result only (set by the CLI for logs and CI)."""
    return os.environ.get("DISTILL_QUIET") == "1"


def quiet_ray_loggers() -> None:
    """Ray Serve/Data/Train narrate every step at INFO on the driver; our own lines say enough."""
    import ray.data  # noqa: F401  (these configure their loggers on import: quiet them afterwards)
    import ray.serve  # noqa: F401

    for name in ("ray.serve", "ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The DataContext travels with each dataset, so this also quiets Train's split coordinator.
    ray.data.DataContext.get_current().enable_progress_bars = False


def _user_error(e: BaseException) -> DistillError | None:
    """Find the DistillError a Ray worker raised, through Ray's exception wrappers."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DistillError) and getattr(e, "cause", None) is None:
            return e  # the user's error itself, not Ray's wrapper around it (which prints a traceback)
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def _reraise_user_error(e: BaseException):
    found = _user_error(e)
    if found is None:
        for line in str(e).splitlines()[::-1]:
            if "DistillError: " in line:
                found = DistillError(line.split("DistillError: ", 1)[1])
                break
    if found is not None:
        raise found from None
    raise e


# ---- label ----------------------------------------------------------------------------------


def label(cfg: DistillConfig, prep: Prepared, reensemble: bool = False) -> LabelStore:
    store = LabelStore(cfg.store_path)
    if store.exists():
        store.check_identity(prep.identity)
        if reensemble:
            return reensemble_store(store, prep.ensemble)
        if store.manifest.get("ensemble") != prep.ensemble:
            raise DistillError(
                f"store {store.uri}: ensemble settings differ from the store's "
                f"({_dict_diff(store.manifest.get('ensemble', {}), prep.ensemble)}); "
                "run `distill label --reensemble` to recompute the soft labels without the teachers"
            )
        missing = store.record_finished()
        if not missing:
            log.info("label: store %s is complete (%d shards): no teacher work", store.uri, store.num_shards)
            return store
    elif reensemble:
        raise DistillError(f"store {store.uri} does not exist: run `distill label` first")
    else:
        missing = None

    from actors import teacher as serve_teachers

    teachers = [t.model_dump() for t in cfg.teachers]
    # Teachers with `serve_app` are already running (a RayService, say): use them, leave them up.
    apps = serve_teachers.attach([t for t in teachers if t["serve_app"]])
    owned = serve_teachers.deploy(cfg.run.name, [t for t in teachers if not t["serve_app"]], cfg.task, cfg.lm.k)
    apps.update(owned)
    apps = {t["name"]: apps[t["name"]] for t in teachers}  # config order
    try:
        try:
            infos = serve_teachers.probe(apps, _first_input(prep.train))
        except Exception as e:  # a teacher that cannot take the data (wrong width...): one line
            _reraise_user_error(e)
        _check_fingerprints(infos, prep.identity["teachers"], apps)
        num_classes = _check_teachers(infos, prep.train)
        if missing is None:  # a new store: written only once the teachers are known to be sound
            extra = {"lm": {"vocab_size": num_classes, "max_len": cfg.lm.max_len}} if cfg.task == "lm" else {}
            store.create({**prep.identity, "ensemble": prep.ensemble, "num_classes": num_classes, **extra}, prep.train)
            missing = list(range(store.num_shards))
        _label_shards(cfg, store, apps, missing)
    finally:
        serve_teachers.shutdown(owned)
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
    return to_numpy(train.column("input_ids").slice(0, 1)) if "input_ids" in train.column_names else features_of(train)[:1]


def _check_teachers(infos: dict[str, dict], train: pa.Table) -> int:
    """Teachers must agree on their output width (classes, or vocabulary size for LMs)."""
    lm = "input_ids" in train.column_names
    what = "vocabulary size" if lm else "number of classes"
    widths = {n: i["num_classes"] for n, i in infos.items()}
    if len(set(widths.values())) != 1:
        raise DistillError(f"teachers disagree on the {what}: " + ", ".join(f"'{n}' has {w}" for n, w in widths.items())
                           + "; one ensemble needs teachers of the same label space (remove or fix the odd one)")
    width = next(iter(widths.values()))
    top = int(np.max(to_numpy(train.column("input_ids")) if lm else train.column("label").to_numpy()))
    if top >= width:
        field = "token id" if lm else "dataset.label: class id"
        raise DistillError(f"{field} {top} found, but the teachers' {what} is {width}")
    return width



def _label_shards(cfg: DistillConfig, store: LabelStore, apps: dict[str, str], shards: list[int]) -> None:
    chunk = {t.name: t.max_batch_size for t in cfg.teachers}
    labeler_args = {"store_uri": store.uri, "apps": apps, "chunk": chunk, "run": cfg.run.name}
    executor = _label_executor(cfg)
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
        _reraise_user_error(e)
    finally:
        results.close()  # the driver executor: cancel shards not yet started
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def _label_executor(cfg: DistillConfig) -> str:
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
    """Recompute the soft labels of every shard from the stored teacher outputs (no teacher)."""
    if missing := store.record_finished():
        raise DistillError(f"store {store.uri} is not fully labeled: {store.describe_missing(missing)}; "
                           "run `distill label` before --reensemble")
    manifest = {**store.manifest, "ensemble": ensemble}
    for i in sorted(int(s) for s in store.manifest["shards"]):
        inputs, outputs = stored_outputs(store.read_shard(i), manifest)
        store.write_shard(i, build_shard(inputs, outputs, manifest)[0])
    store.manifest["ensemble"] = ensemble
    store.record_finished()
    log.info("label: re-ensembled %d shards as %s", store.num_shards, ensemble)
    return store


def _dict_diff(have: dict, want: dict) -> str:
    return ", ".join(f"{k}: store {have.get(k)!r} vs config {want.get(k)!r}"
                     for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k))


# ---- train ----------------------------------------------------------------------------------


def open_complete_store(cfg: DistillConfig, prep: Prepared) -> LabelStore:
    """The store training reads, checked first: same setup, every shard present and intact."""
    store = LabelStore(cfg.store_path)
    if not store.exists():
        raise DistillError(f"no label store at {store.uri}: run `distill label` first")
    store.check_identity(prep.identity)
    if missing := store.record_finished():
        raise DistillError(f"store {store.uri} is not fully labeled: {store.describe_missing(missing)}; "
                           "run `distill label` to label what is missing")
    return store


def train(cfg: DistillConfig, prep: Prepared, store: LabelStore, name: str, loss: str, alpha: float) -> dict:
    """Train one student with Ray Train; return its final state (also saved in the run folder).

    The Ray Train run is named after the settings that shape the result, so re-running the
    same settings resumes from the latest checkpoint and changed settings start afresh.
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from actors.student import EpochLog, load_state, train_loop

    t = cfg.train
    rows = min(t.max_samples or prep.train.num_rows, prep.train.num_rows)
    spec, columns = _student_spec(cfg, prep.train.slice(0, rows), store.manifest["num_classes"])
    loop_cfg = {
        "task": cfg.task, "k": cfg.lm.k, "columns": columns, "run": cfg.run.name, "name": name,
        "student": spec, "loss": loss, "alpha": alpha, "beta": t.beta, "temperature": cfg.ensemble.temperature,
        "lr": t.lr, "weight_decay": t.weight_decay, "epochs": t.epochs, "batch_size": t.batch_size,
        "seed": t.seed, "shuffle_buffer": max(t.batch_size * 4, 256), "threads": 1,
        # Each worker keeps its shard in memory after the first pass when it is small: a new
        # streaming execution per epoch costs seconds, far more than a tiny epoch itself.
        "cache_rows": t.cache_rows,
    }
    # `epochs` is left out: raising it resumes the same run and trains the extra epochs.
    key = {"loop": {k: v for k, v in loop_cfg.items() if k != "epochs"}, "workers": t.workers, "store": store.manifest["shards"], "ensemble": store.manifest["ensemble"]}
    run_name = f"{name}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]}"

    ds = _train_dataset(store, ["row", *columns], rows, t.read_in_driver_mb)
    storage = str((cfg.run_dir / "train").resolve()) if "://" not in cfg.output_dir else f"{cfg.output_dir}/{cfg.run.name}/train"
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **t.worker_resources,
                                                           **({"GPU": 1} if t.use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level="WARNING"),
                             callbacks=[EpochLog(name, t.epochs)]),
        datasets={"train": ds},
        # Same seed, same student: blocks reach the split in store order and are dealt to the
        # workers by row count alone (not by node locality), so each worker's rows and their
        # shuffled order are a function of the seed.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True),
                                  enable_shard_locality=False),
    )
    log.info("train: %s (loss=%s, alpha=%s) on %d rows, %d workers, run %s", name, loss, alpha, rows, t.workers, run_name)
    try:
        result = trainer.fit()
    except Exception as e:
        _reraise_user_error_or(e, f"training '{name}' failed (train.max_failures={t.max_failures}); "
                                  f"checkpoints kept in {storage}/{run_name}: {_last_line(e)}")
    if result.checkpoint is None:
        raise DistillError(f"training '{name}' produced no checkpoint (see {storage}/{run_name})")
    state = load_state(result.checkpoint)
    state["loss"] = loss
    out = cfg.run_dir / "students"
    out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.save(state, out / f"{name}.pt")
    return state


def read_in_driver(store: LabelStore, read_in_driver_mb: float) -> bool:
    """train.read_in_driver_mb's rule: is this store small enough to be read by the driver?"""
    return store.shard_bytes / 2**20 <= read_in_driver_mb


def _train_dataset(store: LabelStore, columns: list[str], rows: int, read_in_driver_mb: float):
    """The store's first `rows` rows as a Ray Dataset, in store order (for deterministic splits).

    A small store is read here with pyarrow (20k rows: ~0.05 s) and handed over whole:
    read_parquet over many small shard files spends seconds planning and launching read tasks
    before the first batch (7.5 s vs 0.4 s for 79 files measured, BENCHMARKS.md), most of a
    small run's first epoch. A big one streams, so no node needs to hold it all.
    """
    import ray.data

    size_mb = store.shard_bytes / 2**20
    if read_in_driver(store, read_in_driver_mb):
        log.info("train: store %.1f MB <= train.read_in_driver_mb=%g: read by the driver", size_mb, read_in_driver_mb)
        table = store.read_table(columns)  # soft.* resolved when stored by reference
        return ray.data.from_arrow(table.slice(0, rows))  # shards hold rows 0..n-1 in order
    log.info("train: store %.1f MB > train.read_in_driver_mb=%g: streamed with read_parquet", size_mb, read_in_driver_mb)
    stored, renames = store.parquet_columns(columns)  # soft.* resolved when stored by reference
    ds = ray.data.read_parquet(store.shard_paths(), filesystem=store.fs).select_columns(stored)
    ds = ds.rename_columns(renames) if renames else ds
    return ds.filter(expr=f"row < {rows}") if rows < store.manifest["dataset"]["rows"] else ds


def _student_spec(cfg: DistillConfig, rows: pa.Table, width: int) -> tuple[dict, list[str]]:
    """The student's build spec (plain data) and the store columns its loop reads."""
    if cfg.task == "lm":
        path = Path(cfg.lm.student_config)
        try:
            hf = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DistillError(f"lm.student_config: cannot read {path}: {e}") from None
        if hf.get("vocab_size") != width:
            raise DistillError(f"lm.student_config: vocab_size {hf.get('vocab_size')} in {path} "
                               f"differs from the teachers' {width}")
        ids, lps = topk_columns("soft")
        return {"arch": "causal_lm", "config": hf}, ["input_ids", ids, lps]
    x = features_of(rows)
    spec = {"arch": cfg.student.arch, "in_dim": x.shape[1], "num_classes": width, "hidden": cfg.student.hidden,
            "mean": x.mean(0).tolist(), "std": (x.std(0) + 1.0).tolist()}
    return spec, ["features", "label", SOFT_COLUMN]


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _reraise_user_error_or(e: BaseException, message: str):
    if _user_error(e) is not None:
        _reraise_user_error(e)
    raise DistillError(message) from None


def train_students(cfg: DistillConfig, prep: Prepared, store: LabelStore | None = None) -> dict[str, dict]:
    store = store or open_complete_store(cfg, prep)
    states = {"student": train(cfg, prep, store, "student", cfg.train.loss, cfg.train.alpha)}
    if cfg.eval.baseline:  # same student, same budget, hard labels only: kd with alpha=1 is plain CE
        states["student_hard"] = train(cfg, prep, store, "student_hard", "kd", 1.0)
    return states


# ---- evaluate + report ----------------------------------------------------------------------


def evaluate_and_report(cfg: DistillConfig, prep: Prepared, states: dict[str, dict] | None = None) -> dict:
    from .evaluate import evaluate, evaluate_lm

    if states is None:
        states = _load_students(cfg)
    teachers = [t.model_dump() for t in cfg.teachers]
    store = LabelStore(cfg.store_path)
    if cfg.task == "lm":
        vocab = store.load_manifest()["lm"]["vocab_size"]
        results = evaluate_lm(prep.test, teachers, prep.ensemble, states, cfg.lm.k, vocab)
    else:
        results = evaluate(prep.test, teachers, prep.ensemble, states)
    metrics.eval_results(cfg.run.name, results["models"])
    curves = {name: s["history"] for name, s in states.items()}
    extra = {"config": cfg.model_dump(mode="json"), "store": store.summary() if store.exists() else None}
    path = write_report(cfg.run_dir, cfg.run.name, cfg.task, results, curves, extra)
    return {"report": str(path), "table": table(results["models"], cfg.task), **results}


def _load_students(cfg: DistillConfig) -> dict[str, dict]:
    import torch

    names = ["student", "student_hard"] if cfg.eval.baseline else ["student"]
    states = {}
    for n in names:
        p = cfg.run_dir / "students" / f"{n}.pt"
        if not p.exists():
            raise DistillError(f"no trained '{n}' at {p}: run `distill train` first")
        states[n] = torch.load(p, map_location="cpu", weights_only=False)
    return states


# ---- the whole run --------------------------------------------------------------------------


def run(cfg: DistillConfig) -> dict:
    t0, timings, name = time.perf_counter(), {}, cfg.run.name
    prep = prepare(cfg)
    with ray_session(cfg):
        with metrics.stage(name, "label", timings):
            label(cfg, prep)
        with metrics.stage(name, "train", timings):
            states = train_students(cfg, prep)
    with metrics.stage(name, "evaluate", timings):
        out = evaluate_and_report(cfg, prep, states)
    log.info("run: done in %.0fs (%s)", time.perf_counter() - t0, ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return out
