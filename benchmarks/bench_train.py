"""kd_vs_hard_train, train-worker scaling, and the store read (train.read_in_driver_mb) before/after.

    python -m benchmarks.bench_train [--quick] [--repeats N]

A complete classification store (~20k rows of repeated digits, 3 teachers, soft labels at T=4)
is written once without Ray (the teachers called directly, the real LabelStore). Then, per
repeat, side by side in alternating order, pipeline.train (Ray Train, the real train loop,
2 workers, batch 64 per worker, 1 torch thread per worker, the student MLP 64-32-10) runs.
Every run but kd_streamed keeps the default train.read_in_driver_mb (256 MB: this store is read
by the driver with pyarrow and handed to Ray Data with ray.data.from_arrow):

  kd        loss kd, alpha 0.1: reads features + label + soft.probs
  kd_a1     loss kd, alpha 1.0 (what the pipeline's `student_hard` baseline is): plain CE on the
            hard labels, but it still reads the soft column and evaluates the KL term's inputs
  hard      a true hard-only baseline: the same train loop with the dataset reduced to
            features + label and a step computing only cross_entropy(model(x), y)
            (benchmarks.bench_train.hard_only_loop; patched in for this run only)
  kd_w1     kd with 1 worker (scaling)
  kd_streamed  kd with train.read_in_driver_mb 0: the store streams through ray.data.read_parquet
            (the path before the fix), for the before/after of the driver read

After the runs of a repeat, one pass over the store in the driver (batches of 64, no Train)
through training.train_dataset with read_in_driver_mb 0 (read_parquet) and with a limit above
the store's size (pyarrow + from_arrow): the read path's own cost without Ray Train around it.

Throughput: the run history's per-epoch samples_per_s (rank 0's rows / epoch time) times the
world size, averaged over the epochs as total rows / total epoch time; every run is a fresh
Ray Train run (its own storage path: nothing resumes). The wall time of pipeline.train
(Ray Train start + epochs + checkpoints) is reported as a figure too.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import (Samples, classification_config, dataset_rows_for, emit, log, make_dataset, run_main,
                               make_mlp_teachers, ratio_samples, ray_running, sizes)


# ---- the true hard-only baseline (runs in the Ray Train workers) ---------------------------------


def _hard_step(model, loss_fn, batch: dict, config: dict, terms=None):
    """actors.student._classifier_step's signature (terms: train.extra_losses, none here)."""
    import torch.nn.functional as F

    x, y = batch["features"].float(), batch["label"].long()
    return F.cross_entropy(model(x), y), len(y)


def hard_only_loop(config: dict) -> None:
    """actors.student.train_loop with the classifier step replaced by plain cross-entropy."""
    import actors.student as student

    student._classifier_step = _hard_step
    student.train_loop(config)


class hard_only_patch:
    """In the driver: pipeline.train builds a dataset without the soft column and runs hard_only_loop."""

    def __enter__(self):
        import actors.student as student
        from orchestrator import training
        from orchestrator.store import SOFT_COLUMN

        self.saved = (training.student_spec, student.train_loop)
        original = training.student_spec

        def spec(cfg, rows, width):
            s, columns = original(cfg, rows, width)
            return s, [c for c in columns if c != SOFT_COLUMN]

        training.student_spec = spec
        student.train_loop = hard_only_loop
        return self

    def __exit__(self, *exc):
        import actors.student as student
        from orchestrator import training

        training.student_spec, student.train_loop = self.saved


# ---- the store ----------------------------------------------------------------------------------


def build_store(cfg, prep) -> None:
    """A complete classification store, labeled in-process (no Ray): the teachers called directly."""
    from benchmarks.direct import load_teachers
    from orchestrator.datasets import features_of
    from orchestrator.soft_labels import build_shard
    from orchestrator.store import LabelStore

    store = LabelStore(cfg.store_path)
    store.create({**prep.identity, "ensemble": prep.ensemble, "num_classes": 10}, prep.train)
    teachers = load_teachers(cfg)
    for i in range(store.num_shards):
        inputs = store.read_inputs(i)
        x = features_of(inputs)
        table, _ = build_shard(inputs, {n: m(x) for n, m in teachers.items()}, store.manifest)
        store.write_shard(i, table)
    assert not store.record_finished()


def _throughput(state: dict, epochs: slice = slice(None)) -> tuple[float, float]:
    """(samples/s summed over workers, seconds in epochs) over the history's ``epochs``."""
    h = state["history"][epochs]
    seen = sum(e["samples"] for e in h)
    secs = sum(e["samples"] / e["samples_per_s"] for e in h)
    return seen / secs * h[0]["world_size"], secs


def main(quick: bool, repeats: int) -> None:
    from orchestrator import pipeline, training
    from orchestrator.config import config_from_dict

    s = sizes(quick)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    samples, notes = Samples(), {}
    try:
        teachers = make_mlp_teachers(work / "teachers", 3, 64, 1)  # only their soft labels matter here
        data = make_dataset(work / "data.parquet", dataset_rows_for(s["train_rows"]))
        base = classification_config(work, teachers, data, s, name="train", store={"path": str(work / "store")})
        cfg = config_from_dict(base)
        prep = pipeline.prepare(cfg)
        build_store(cfg, prep)
        store = pipeline.open_complete_store(cfg, prep)
        notes.update(rows=prep.train.num_rows, shards=store.num_shards, epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
                     student=f"MLP 64-{cfg.student.hidden}-10")
        # Which path the default config takes for this store (training.train_dataset's rule).
        notes.update(store_mb=round(store.shard_bytes / 2**20, 2), read_in_driver_mb_default=cfg.train.read_in_driver_mb,
                     default_read="driver" if training.read_in_driver(store, cfg.train.read_in_driver_mb) else "streamed")
        log(f"train: store of {prep.train.num_rows} rows ready")

        def run(tag: str, r: int, workers: int, alpha: float, hard: bool = False, streamed: bool = False) -> None:
            train = {**base["train"], "workers": workers, "alpha": alpha}
            if streamed:
                train["read_in_driver_mb"] = 0  # the path before the fix: ray.data.read_parquet
            c = config_from_dict({**base, "output_dir": str(work / f"runs-{tag}-{r}"), "train": train})
            for attempt in (1, 2):  # one retry: a lost Ray Train run says nothing about throughput
                t0 = time.perf_counter()
                try:
                    if hard:
                        with hard_only_patch():
                            state = pipeline.train(c, prep, store, "student_hard", "kd", 1.0)
                    else:
                        state = pipeline.train(c, prep, store, "student", "kd", alpha)
                    break
                except Exception as e:
                    if attempt == 2:
                        raise
                    notes["retried runs"] = notes.get("retried runs", 0) + 1
                    log(f"train repeat {r}: {tag} failed ({str(e).splitlines()[0][:200]}); retrying once afresh")
                    c = config_from_dict({**c.model_dump(mode="json"), "output_dir": str(work / f"runs-{tag}-{r}-retry")})
            wall = time.perf_counter() - t0
            rate, secs = _throughput(state)
            first, _ = _throughput(state, slice(0, 1))
            cached, _ = _throughput(state, slice(1, None))
            samples.add(f"{tag}_samples_per_s", rate)
            samples.add(f"{tag}_first_epoch_samples_per_s", first)
            samples.add(f"{tag}_cached_samples_per_s", cached)
            samples.add(f"{tag}_wall_s", wall)
            samples.add(f"{tag}_outside_epochs_s", wall - secs)
            log(f"train repeat {r}: {tag} {rate:,.0f} samples/s (first epoch {first:,.0f}, later epochs {cached:,.0f}), "
                f"pipeline.train {wall:.1f}s of which {secs:.1f}s in epochs")

        def store_pass(r: int) -> None:
            """One pass over the store in the driver: training.train_dataset streamed vs read by the driver."""
            cols = ["row", "features", "label", "soft.probs"]
            rows, big = prep.train.num_rows, float(2**30)
            makers = [("read_parquet", lambda: training.train_dataset(store, cols, rows, 0)),
                      ("pyarrow", lambda: training.train_dataset(store, cols, rows, big))]
            for name, make in (makers if r % 2 == 0 else makers[::-1]):
                t0 = time.perf_counter()
                n = sum(len(b["row"]) for b in make().iter_torch_batches(batch_size=64))
                assert n == prep.train.num_rows
                samples.add(f"pass_{name}_s", time.perf_counter() - t0)
            log(f"train repeat {r}: one pass over the store in the driver: read_parquet "
                f"{samples.values['pass_read_parquet_s'][-1]:.2f}s, pyarrow + from_arrow {samples.values['pass_pyarrow_s'][-1]:.2f}s")

        with ray_running():
            if not quick:
                run("warmup", 0, 2, 0.1)  # untimed: worker processes, imports, gloo
            for r in range(repeats):
                steps = [("kd", lambda: run("kd", r, 2, 0.1)), ("kd_a1", lambda: run("kd_a1", r, 2, 1.0)),
                         ("hard", lambda: run("hard", r, 2, 1.0, hard=True)), ("kd_w1", lambda: run("kd_w1", r, 1, 0.1)),
                         ("kd_streamed", lambda: run("kd_streamed", r, 2, 0.1, streamed=True))]
                for _, fn in (steps if r % 2 == 0 else steps[::-1]):
                    fn()
                store_pass(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratio_samples(samples, "kd_vs_hard", "kd_samples_per_s", "hard_samples_per_s")
    ratio_samples(samples, "kd_vs_kd_alpha1", "kd_samples_per_s", "kd_a1_samples_per_s")
    ratio_samples(samples, "kd_vs_hard_wall", "hard_wall_s", "kd_wall_s")
    ratio_samples(samples, "kd_vs_hard_cached", "kd_cached_samples_per_s", "hard_cached_samples_per_s")
    ratio_samples(samples, "kd_vs_hard_first", "kd_first_epoch_samples_per_s", "hard_first_epoch_samples_per_s")
    ratio_samples(samples, "workers_2_vs_1", "kd_samples_per_s", "kd_w1_samples_per_s")
    ratio_samples(samples, "driver_read_speedup", "kd_samples_per_s", "kd_streamed_samples_per_s")
    ratio_samples(samples, "driver_read_wall_speedup", "kd_streamed_wall_s", "kd_wall_s")
    ratio_samples(samples, "driver_read_first_epoch_speedup", "kd_first_epoch_samples_per_s",
                  "kd_streamed_first_epoch_samples_per_s")
    ratio_samples(samples, "workers_2_vs_1_cached", "kd_cached_samples_per_s", "kd_w1_cached_samples_per_s")
    emit(ratios={"kd_vs_hard_train": "kd_vs_hard", "kd_vs_kd_alpha1_train": "kd_vs_kd_alpha1",
                 "kd_vs_hard_train_wall": "kd_vs_hard_wall", "kd_vs_hard_train_first_epoch": "kd_vs_hard_first",
                 "kd_vs_hard_train_cached_epochs": "kd_vs_hard_cached", "train_workers_2_vs_1": "workers_2_vs_1",
                 "train_workers_2_vs_1_cached_epochs": "workers_2_vs_1_cached",
                 "train_read_driver_vs_streamed": "driver_read_speedup",
                 "train_read_driver_vs_streamed_first_epoch": "driver_read_first_epoch_speedup",
                 "train_read_driver_vs_streamed_wall": "driver_read_wall_speedup"},
         figures={"train_kd_samples_per_s": "kd_samples_per_s", "train_kd_alpha1_samples_per_s": "kd_a1_samples_per_s",
                  "train_hard_only_samples_per_s": "hard_samples_per_s",
                  "train_kd_1worker_samples_per_s": "kd_w1_samples_per_s",
                  "train_kd_first_epoch_samples_per_s": "kd_first_epoch_samples_per_s",
                  "train_kd_cached_epochs_samples_per_s": "kd_cached_samples_per_s",
                  "train_hard_only_first_epoch_samples_per_s": "hard_first_epoch_samples_per_s",
                  "train_hard_only_cached_epochs_samples_per_s": "hard_cached_samples_per_s",
                  "train_kd_outside_epochs_s": "kd_outside_epochs_s",
                  "train_store_pass_read_parquet_s": "pass_read_parquet_s",
                  "train_store_pass_pyarrow_s": "pass_pyarrow_s",
                  "train_kd_streamed_samples_per_s": "kd_streamed_samples_per_s",
                  "train_kd_streamed_first_epoch_samples_per_s": "kd_streamed_first_epoch_samples_per_s",
                  "train_kd_streamed_cached_epochs_samples_per_s": "kd_streamed_cached_samples_per_s",
                  "train_kd_streamed_outside_epochs_s": "kd_streamed_outside_epochs_s",
                  "train_kd_streamed_wall_s": "kd_streamed_wall_s",
                  "train_kd_wall_s": "kd_wall_s", "train_hard_only_wall_s": "hard_wall_s",
                  "train_kd_1worker_wall_s": "kd_w1_wall_s"},
         samples=samples, notes=notes)


if __name__ == "__main__":
    run_main(main)
