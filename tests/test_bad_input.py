"""Bad input: one line `error: ...`, exit code 2, and nothing half-written in the store."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.cli import main
from orchestrator.store import LabelStore
from tests.helpers import NaNTeacher, save_script, tiny_config, write_yaml


def _run_cli(capsys, cfg_path: Path, *args: str) -> str:
    code = main(["label", str(cfg_path), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def _no_store(cfg: dict) -> bool:
    return not (Path(cfg["output_dir"]) / cfg["run"]["name"] / "store").exists()


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda c: c["teachers"][0].update(path="/nonexistent/teacher.pt"), r"teacher 'linear': path not found: /nonexistent"),
        (lambda c: c["ensemble"].update(mode="median"), r"ensemble.mode: Input should be 'mean_prob', .*'ca_mkd' \(got 'median'\)"),
        (lambda c: c["train"].update(epohcs=3), r"train.epohcs: unknown key"),
        (lambda c: c["teachers"][1].update(backend="onnx"), r"teachers.1.backend: Input should be 'torch', 'hf' or 'vllm' \(got 'onnx'\)"),
        (lambda c: c["store"].update(shard_size=-5), r"store.shard_size: Input should be greater than or equal to 1"),
    ],
    ids=["missing-teacher-path", "unknown-mode", "mistyped-key", "unknown-backend", "negative-size"],
)
def test_config_errors(tmp_path, teachers, capsys, change, expect):
    import re

    cfg = tiny_config(tmp_path, teachers)
    change(cfg)
    err = _run_cli(capsys, write_yaml(tmp_path / "c.yaml", cfg))
    assert re.search(expect, err), err
    assert _no_store(cfg)


def _parquet(path: Path, table: pa.Table) -> str:
    pq.write_table(table, path)
    return str(path)


def test_empty_dataset(tmp_path, teachers, capsys):
    src = _parquet(tmp_path / "empty.parquet", pa.table({"features": pa.array([], pa.list_(pa.float32())), "label": pa.array([], pa.int64())}))
    cfg = tiny_config(tmp_path, teachers, dataset={"source": src})
    assert "has no rows" in _run_cli(capsys, write_yaml(tmp_path / "c.yaml", cfg))
    assert _no_store(cfg)


def test_missing_label_column(tmp_path, teachers, capsys):
    src = _parquet(tmp_path / "nolabel.parquet", pa.table({"features": [[1.0] * 64] * 10, "target": list(range(10))}))
    cfg = tiny_config(tmp_path, teachers, dataset={"source": src})
    err = _run_cli(capsys, write_yaml(tmp_path / "c.yaml", cfg))
    assert "dataset.label: column 'label' not found" in err and "available columns: features, target" in err
    assert _no_store(cfg)


def test_console_script_exits_nonzero(tmp_path, teachers):
    import subprocess

    cfg = tiny_config(tmp_path, teachers, trian={"epochs": 1})
    p = subprocess.run(["distill", "run", str(write_yaml(tmp_path / "c.yaml", cfg))], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == "error: " + str(tmp_path / "c.yaml") + ": trian: unknown key (check the spelling)"


@pytest.mark.slow
def test_teacher_returning_nan_writes_no_shard_for_the_bad_part(ray_local, tmp_path, teachers, capsys):
    bad = save_script(NaNTeacher(), tmp_path / "nan.pt")
    cfg = tiny_config(tmp_path, {"linear": teachers["linear"], "broken": bad}, store={"shard_size": 100})
    err = _run_cli(capsys, write_yaml(tmp_path / "c.yaml", cfg))
    assert "teacher 'broken' returned NaN/Inf" in err and "nothing was written for this shard" in err
    store = LabelStore(cfg["output_dir"] + "/tiny/store")
    store.load_manifest()
    done = store.finished_shards()
    for i in range(store.num_shards):  # every shard holding a NaN row must be absent
        x = store.read_inputs(i).column("features").combine_chunks().flatten().to_numpy().reshape(-1, 64)
        if (x[:, 5] > 12).any():
            assert i not in done
    assert len(done) < store.num_shards


@pytest.mark.slow
def test_teachers_with_different_class_counts(ray_local, tmp_path, teachers, capsys):
    from tests.helpers import train_tiny

    nine = save_script(train_tiny(0, seed=3, num_classes=9, steps=5), tmp_path / "nine.pt")
    cfg = tiny_config(tmp_path, {"linear": teachers["linear"], "nine": nine})
    err = _run_cli(capsys, write_yaml(tmp_path / "c.yaml", cfg))
    assert "teachers disagree on the number of classes: 'linear' has 10, 'nine' has 9" in err
    assert _no_store(cfg)
