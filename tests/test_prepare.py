"""prepare (no Ray): splits, the held-out file, and one store identity whatever the config's
teacher order."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.config import config_from_dict
from orchestrator.datasets import features_of
from orchestrator.errors import DistillError
from orchestrator.prepare import prepare
from tests.helpers import tiny_config


def _digits_file(path, rows: slice, width: int = 64) -> str:
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data[rows, :width].astype(np.float32), d.target[rows]
    pq.write_table(pa.table({"features": pa.array(x.tolist()), "label": pa.array(y)}), path)
    return str(path)


def test_classification_reads_its_held_out_split_from_test_source(teachers, tmp_path):
    source, test = _digits_file(tmp_path / "train.parquet", slice(0, 300)), _digits_file(tmp_path / "test.parquet", slice(300, 420))
    prep = prepare(config_from_dict(tiny_config(tmp_path, teachers, dataset={"source": source, "test_source": test})))
    assert prep.train.num_rows == 300  # every source row is labeled: no test_fraction split
    assert prep.test.num_rows == 120
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(features_of(prep.test), load_digits().data[300:420].astype(np.float32))


def test_test_source_of_another_width_is_refused(teachers, tmp_path):
    source, test = _digits_file(tmp_path / "a.parquet", slice(0, 50)), _digits_file(tmp_path / "b.parquet", slice(50, 60), 10)
    with pytest.raises(DistillError, match=r"dataset\.test_source: .*b\.parquet has 10 features, dataset\.source has 64"):
        prepare(config_from_dict(tiny_config(tmp_path, teachers, dataset={"source": source, "test_source": test})))


def test_teacher_order_in_the_config_does_not_change_the_identity(teachers, tmp_path):
    cfg = tiny_config(tmp_path, teachers)
    flipped = {**cfg, "teachers": cfg["teachers"][::-1]}
    a, b = prepare(config_from_dict(cfg)), prepare(config_from_dict(flipped))
    assert [t["name"] for t in a.identity["teachers"]] == ["linear", "mlp"]
    assert a.identity == b.identity and a.ensemble == b.ensemble
