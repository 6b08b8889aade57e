"""Stage 3, train: Ray Train's TorchTrainer runs actors/student.py:train_loop on the store (KD
student, and the same student on hard labels as the baseline)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pyarrow as pa

from .config import DistillConfig
from .datasets import features_of
from .errors import DistillError
from .instruct import is_packed
from .prepare import Prepared, cls_tokenizer, lm_student_spec
from .session import last_line, reraise_user_error
from .store import SOFT_COLUMN, SOFT_TOPK, LabelStore, open_store, topk_columns

log = logging.getLogger("distill")
# TEST ONLY: a JSON object handed to the train loop as config["test_hooks"] (tests/test_resume.py):
# {"record_rows": true} keeps every rank's consumed store rows per epoch in the history;
# {"kill_at_step": N, "kill_rank": R} SIGKILLs worker R after optimiser step N (once). Never set it otherwise.
TEST_HOOKS_ENV = "DISTILL_TEST_HOOKS"


def open_complete_store(cfg: DistillConfig, prep: Prepared) -> LabelStore:
    """The store training reads, checked first: same setup, every shard present and intact."""
    store = open_store(cfg.store_path)
    if not store.exists():
        raise DistillError(f"no label store at {store.uri}: run `distill label` first")
    store.check_identity(prep.identity)
    if missing := store.record_finished():
        raise DistillError(f"store {store.uri} is not fully labeled: {store.describe_missing(missing)}; "
                           "run `distill label` to label what is missing")
    return store


def train_students(cfg: DistillConfig, prep: Prepared, store: LabelStore | None = None) -> dict[str, dict]:
    store = store or open_complete_store(cfg, prep)
    from actors.on_policy import teachers_for_training

    with teachers_for_training(cfg, prep, store) as on_policy:  # train.on_policy: Serve teachers up meanwhile
        states = {"student": drop_training_state(train(cfg, prep, store, "student", cfg.train.loss, cfg.train.alpha,
                                                       on_policy=on_policy, extra_losses=cfg.train.extra_losses))}
    if cfg.eval.baseline:  # same student, same budget, hard labels only: kd with alpha=1 is plain CE
        from . import teacher_pool

        teacher_pool.end("the hard-label baseline (eval.baseline) trains without them")  # when pipeline.run held them
        if cfg.train.extra_losses:
            log.info("train: student_hard trains on the hard labels only (no soft labels, no train.extra_losses)")
        states["student_hard"] = drop_training_state(train(cfg, prep, store, "student_hard", "kd", 1.0))
    return states


def train(cfg: DistillConfig, prep: Prepared, store: LabelStore, name: str, loss: str, alpha: float,
          on_policy: dict | None = None, extra_losses: list[dict] = ()) -> dict:
    """Train one student with Ray Train; return its final state (also saved in the run folder).
    extra_losses: train.extra_losses terms beside the response loss (orchestrator/extra_terms.py).

    The Ray Train run is named after the settings that shape the result, so re-running the
    same settings resumes from the latest checkpoint and changed settings start afresh.
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from actors.student import EpochLog, load_state, train_loop

    t = cfg.train
    rows = min(t.max_samples or prep.train.num_rows, prep.train.num_rows)
    spec, columns = student_spec(cfg, prep.train.slice(0, rows), store.manifest["num_classes"])
    loop_cfg = {
        "task": cfg.task, "k": cfg.lm.k, "columns": columns, "run": cfg.run.name, "name": name,
        "student": spec, "loss": loss, "alpha": alpha, "beta": t.beta, "temperature": cfg.ensemble.temperature,
        "lr": t.lr, "weight_decay": t.weight_decay, "epochs": t.epochs, "batch_size": t.batch_size,
        "seed": t.seed, "shuffle_buffer": max(t.batch_size * 4, 256), "threads": 1,
        # Each worker keeps its shard in memory after the first pass when it is small: a new
        # streaming execution per epoch costs seconds, far more than a tiny epoch itself.
        "cache_rows": t.cache_rows,
        "schedule": t.schedule, "warmup_steps": t.warmup_steps, "min_lr_ratio": t.min_lr_ratio,
        "grad_clip": t.grad_clip, "grad_accum": t.grad_accum, "max_steps": t.max_steps, "use_gpu": t.use_gpu,
        "total_steps": total_steps(rows, t), "checkpoint_every": t.checkpoint_every,
        "strategy": t.strategy, "gradient_checkpointing": t.gradient_checkpointing,  # checked in prepare
    }
    if on_policy:  # actors/on_policy.py: the served teachers and the sampling settings
        loop_cfg["on_policy"] = on_policy
    if extra_losses:  # checked against the stored feature shapes; their columns join the train read
        from .extra_terms import plan_terms
        from .lm_extra_terms import plan_lm_terms

        loop_cfg["extra_terms"] = plan_lm_terms(cfg, store, extra_losses) if cfg.task == "lm" else \
            plan_terms(cfg, store, extra_losses, spec, features_of(prep.train.slice(0, 1)).shape[1])
        feats = list(dict.fromkeys(p["column"] for r in loop_cfg["extra_terms"] for p in r["parts"]))
        at = len(columns) - 2 if cfg.task == "lm" else len(columns)  # LM: the top-k columns stay last (LMBatch)
        columns[at:at] = feats
        for r in loop_cfg["extra_terms"]:
            log.info("train: %s extra term %s", name, r["label"])
    if hooks := os.environ.get(TEST_HOOKS_ENV):  # TEST ONLY, see TEST_HOOKS_ENV
        loop_cfg["test_hooks"] = json.loads(hooks)
    # `epochs` (and the schedule length it implies) is left out: raising it resumes the same run
    # and trains the extra epochs, the lr schedule stretched over the new length.
    # checkpoint_every is left out too: checkpoints do not change what is trained.
    key = {"loop": {k: v for k, v in loop_cfg.items() if k not in ("epochs", "total_steps", "checkpoint_every")},
           "workers": t.workers,
           "store": store.manifest["shards"], "ensemble": store.manifest["ensemble"]}
    run_name = f"{name}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]}"

    ds = train_dataset(store, ["row", *columns], rows, t.read_in_driver_mb)
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
        reraise_user_error(e, otherwise=f"training '{name}' failed (train.max_failures={t.max_failures}); "
                                        f"checkpoints kept in {storage}/{run_name}: {last_line(e)}")
    if result.checkpoint is None:
        raise DistillError(f"training '{name}' produced no checkpoint (see {storage}/{run_name})")
    state = load_state(result.checkpoint, mmap=True)
    state["loss"] = loss
    state.pop("extra_terms", None)  # the hint projections train with the student but are not part of it
    out = cfg.run_dir / "students"
    out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.save(state, out / f"{name}.pt")  # the full state (optimiser too), for resuming and `distill export`
    if cfg.task == "lm" or cfg.student.arch == "hf":
        state["export"] = str(export(state, prep, out / name, cls_tokenizer(cfg), export_dtype(cfg)))
    return state


def drop_training_state(state: dict) -> dict:
    """What the driver keeps of a trained student for evaluation: spec, weights, history. AdamW's
    state is twice the float32 weights (a 1B student: 8 GB more in the driver); it stays in
    students/NAME.pt (and `train` returns it, memory-mapped from the checkpoint)."""
    for key in ("optimizer", "scheduler", "rng"):
        state.pop(key, None)
    return state


def export_dtype(cfg: DistillConfig) -> str:
    """student.export_dtype, resolved: auto is the dtype of the checkpoint the student started
    from (config.json's dtype / torch_dtype, as transformers saves it), float32 from scratch."""
    if cfg.student.export_dtype != "auto":
        return cfg.student.export_dtype
    source = cfg.student_spec_source
    if source["init"] == "scratch":
        return "float32"
    saved = json.loads((Path(source["path"]) / "config.json").read_text())
    dtype = saved.get("dtype") or saved.get("torch_dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def export(state: dict, prep: Prepared, out: Path, cls_tokenizer_dir: str | None = None, dtype: str = "float32") -> Path:
    """A trained student as a save_pretrained dir with the ensemble's tokenizer, its weights in
    ``dtype``: an LM (transformers, vLLM), or an arch hf sequence classifier (transformers; the
    tokenizer when there is one)."""
    from .students import export_student

    if state["spec"]["arch"] == "hf":
        from .cls_students import export_cls_student

        path = export_cls_student(state["model"], state["spec"], out, cls_tokenizer_dir, dtype)
        log.info("train: exported %s in %s (AutoModelForSequenceClassification.from_pretrained this dir)", path, dtype)
        return path
    spec = {k: v for k, v in state["spec"].items() if k != "arch"}
    path = export_student(state["model"], spec, out, prep.tokenizer, dtype=dtype)
    log.info("train: exported %s in %s (student.export_dtype; transformers / vLLM: from_pretrained this dir)", path, dtype)
    return path


def export_checkpoint(cfg: DistillConfig, prep: Prepared, checkpoint: str | None = None, name: str = "student",
                      out: str | None = None) -> Path:
    """`distill export`: a chosen checkpoint (a Ray Train checkpoint dir, or a state file; default
    the run's final `students/NAME.pt`) as a save_pretrained dir (default `students/NAME/`)."""
    import torch

    from actors.student import STATE_FILE

    if cfg.task != "lm" and cfg.student.arch != "hf":
        raise DistillError(f"distill export: task {cfg.task} students with student.arch {cfg.student.arch} are not "
                           "transformers models; their state is in students/NAME.pt")
    path = Path(checkpoint) if checkpoint else cfg.run_dir / "students" / f"{name}.pt"
    path = path / STATE_FILE if path.is_dir() else path
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # not there, not a torch file (a snapshot .json, say), truncated
        raise DistillError(f"--checkpoint: cannot read a student state from {path}: {type(e).__name__}: {e}; "
                           "give a checkpoint_* dir of the run or a students/NAME.pt file") from None
    return export(state, prep, Path(out) if out else cfg.run_dir / "students" / name, cls_tokenizer(cfg),
                  export_dtype(cfg))


def total_steps(rows: int, t) -> int:
    """Optimiser steps the schedule spans: train.max_steps, else every epoch's steps on one worker."""
    batches = -(-(-(-rows // t.workers)) // t.batch_size)  # per worker, per epoch
    return t.max_steps or t.epochs * -(-batches // t.grad_accum)


def read_in_driver(store: LabelStore, read_in_driver_mb: float) -> bool:
    """train.read_in_driver_mb's rule: is this store small enough to be read by the driver?"""
    return store.shard_bytes / 2**20 <= read_in_driver_mb


def train_dataset(store: LabelStore, columns: list[str], rows: int, read_in_driver_mb: float):
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


def student_spec(cfg: DistillConfig, rows: pa.Table, width: int) -> tuple[dict, list[str]]:
    """The student's build spec (plain data) and the store columns its loop reads."""
    if cfg.task == "lm":
        from .models import load_tokenizer
        from .students import check_student_vocab
        from .vocab import ensemble_tokenizer

        tokens = len(load_tokenizer(ensemble_tokenizer(cfg)))
        spec = check_student_vocab(lm_student_spec(cfg), width, tokens)  # + vocab_size: resized to the ensemble's
        ids, lps = topk_columns(SOFT_TOPK)
        packed = ["position_ids", "loss_mask"] if is_packed(rows) else []
        return {"arch": "causal_lm", **spec}, ["input_ids", *packed, ids, lps]  # top-k last (actors.student.LMBatch)
    x = features_of(rows)
    if cfg.student.arch == "hf":  # a sequence classifier over the features read as token ids
        return hf_cls_spec(cfg, x, width), ["features", "label", SOFT_COLUMN]
    spec = {"arch": cfg.student.arch, "in_dim": x.shape[1], "num_classes": width, "hidden": cfg.student.hidden,
            "mean": x.mean(0).tolist(), "std": (x.std(0) + 1.0).tolist()}
    return spec, ["features", "label", SOFT_COLUMN]


def check_checkpointing(cfg: DistillConfig) -> None:
    """train.gradient_checkpointing, before labeling: the student's transformers class supports it."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .cls_students import cls_student_config
    from .students import lm_student_config

    lm, spec = cfg.task == "lm", lm_student_spec(cfg)
    config = lm_student_config(spec) if lm else cls_student_config(spec)
    auto = AutoModelForCausalLM if lm else AutoModelForSequenceClassification
    cls = auto._model_mapping.get(type(config), None)
    if cls is None or not getattr(cls, "supports_gradient_checkpointing", False):
        raise DistillError(f"train.gradient_checkpointing: the student's {getattr(cls, '__name__', config.model_type)} "
                           "does not support it in transformers; remove it")


def hf_cls_spec(cfg: DistillConfig, x, num_classes: int) -> dict:
    """student.arch hf: the sequence classifier's spec, checked in the driver before any worker
    starts: its num_labels is the ensemble's class count, the features fit it as token ids."""
    from .cls_students import check_token_inputs, cls_student_config

    spec = {"arch": "hf", "num_classes": num_classes, **lm_student_spec(cfg)}
    check_token_inputs(cls_student_config(spec), x)
    if (tok := cls_tokenizer(cfg)) is not None:  # its pad id is padding, as for the teachers that share it
        from .models import load_tokenizer

        spec["pad_token_id"] = load_tokenizer(tok, "student.tokenizer").pad_token_id
    return spec
