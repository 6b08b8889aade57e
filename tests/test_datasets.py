"""Dataset loading into the canonical table, validation errors, ids, splits and fingerprints."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.datasets import (
    SKLEARN_BUNDLED,
    content_ids,
    features_of,
    fingerprint,
    load_dataset,
    make_table,
    split_indices,
)
from orchestrator.errors import DistillError

X4 = np.array([[0.5, 1.0, 1.5], [2.0, 2.5, 3.0], [3.5, 4.0, 4.5], [5.0, 5.5, 6.0]], dtype=np.float32)
Y4 = np.array([0, 1, 2, 1], dtype=np.int64)


@pytest.fixture(scope="module")
def digits() -> pa.Table:
    return load_dataset("sklearn:digits")


def write_parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def write_csv(path: Path, header: str, *rows: str) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def list_parquet(tmp_path: Path, **extra) -> Path:
    """features as a list<double> column (not fixed size), plus label and any extra columns."""
    return write_parquet(tmp_path / "data.parquet", {"features": pa.array(X4.astype(np.float64).tolist()),
                                                     "label": pa.array(Y4), **extra})


def scalar_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "data.csv", "f1,f2,f3,y",
                     *(",".join([*map(str, x), str(y)]) for x, y in zip(X4.tolist(), Y4.tolist())))


def load_error(*args, **kwargs) -> str:
    with pytest.raises(DistillError) as info:
        load_dataset(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ---- sources ---------------------------------------------------------------------------------


def test_sklearn_digits_shape_and_schema(digits):
    assert digits.num_rows == 1797
    assert digits.column_names == ["sample_id", "features", "label"]
    assert digits.schema.field("sample_id").type == pa.string()
    assert digits.schema.field("features").type == pa.list_(pa.float32(), 64)
    assert digits.schema.field("label").type == pa.int64()
    x = features_of(digits)
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert sorted(set(digits.column("label").to_pylist())) == list(range(10))
    ids = digits.column("sample_id").to_pylist()
    assert len(set(ids)) == 1797


def test_sklearn_digits_matches_sklearn(digits):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    np.testing.assert_array_equal(features_of(digits), bunch.data.astype(np.float32))
    np.testing.assert_array_equal(digits.column("label").to_numpy(), bunch.target)


def test_other_bundled_dataset_loads():
    iris = load_dataset("sklearn:iris")
    assert (iris.num_rows, features_of(iris).shape[1]) == (150, 4)
    assert sorted(set(iris.column("label").to_pylist())) == [0, 1, 2]


def test_unknown_sklearn_name():
    msg = load_error("sklearn:mnist")
    assert msg.startswith("dataset.source: unknown bundled dataset 'sklearn:mnist'; use one of ")
    for name in SKLEARN_BUNDLED:
        assert f"sklearn:{name}" in msg


def test_parquet_with_list_feature_column(tmp_path):
    t = load_dataset(str(list_parquet(tmp_path)))
    assert t.schema.field("features").type == pa.list_(pa.float32(), 3)
    np.testing.assert_array_equal(features_of(t), X4)
    assert t.column("label").to_pylist() == [0, 1, 2, 1]
    assert t.column("sample_id").to_pylist() == content_ids(X4)


def test_parquet_with_fixed_size_list_feature_column(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"features": pa.FixedSizeListArray.from_arrays(
        pa.array(X4.reshape(-1)), 3), "label": pa.array(Y4)})
    np.testing.assert_array_equal(features_of(load_dataset(str(path))), X4)


def test_csv_with_scalar_feature_columns(tmp_path):
    t = load_dataset(str(scalar_csv(tmp_path)), features=["f1", "f2", "f3"], label="y")
    np.testing.assert_array_equal(features_of(t), X4)
    assert t.column("label").to_pylist() == [0, 1, 2, 1]


def test_feature_column_order_follows_config(tmp_path):
    t = load_dataset(str(scalar_csv(tmp_path)), features=["f3", "f1"], label="y")
    np.testing.assert_array_equal(features_of(t), X4[:, [2, 0]])


def test_single_scalar_feature_column_by_name(tmp_path):
    t = load_dataset(str(scalar_csv(tmp_path)), features="f2", label="y")
    np.testing.assert_array_equal(features_of(t), X4[:, [1]])


def test_id_column_is_used_as_sample_id(tmp_path):
    path = list_parquet(tmp_path, uid=pa.array([10, 11, 12, 13]))
    t = load_dataset(str(path), id_column="uid")
    assert t.column("sample_id").to_pylist() == ["10", "11", "12", "13"]


def test_limit_keeps_first_rows(tmp_path, digits):
    t = load_dataset("sklearn:digits", limit=100)
    assert t.num_rows == 100
    assert t.equals(digits.slice(0, 100))
    path = list_parquet(tmp_path, uid=pa.array(["a", "b", "c", "d"]))
    t = load_dataset(str(path), id_column="uid", limit=2)
    assert t.column("sample_id").to_pylist() == ["a", "b"]
    np.testing.assert_array_equal(features_of(t), X4[:2])
    assert load_dataset(str(path), limit=50).num_rows == 4


# ---- errors ----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.parquet"
    assert load_error(str(path)) == f"dataset.source: file not found: {path}"


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("{}")
    assert load_error(str(path)) == \
        f"dataset.source: unsupported file type '.json' for {path}; use .parquet or .csv"


def test_empty_table(tmp_path):
    path = write_csv(tmp_path / "empty.csv", "f1,f2,label")
    assert load_error(str(path), features=["f1", "f2"]) == f"dataset.source: {path} has no rows"
    path = write_parquet(tmp_path / "empty.parquet", {"features": pa.array([], pa.list_(pa.float32())),
                                                      "label": pa.array([], pa.int64())})
    assert load_error(str(path)) == f"dataset.source: {path} has no rows"


def test_missing_label_column_lists_available(tmp_path):
    path = list_parquet(tmp_path)
    assert load_error(str(path), label="target") == (
        f"dataset.label: column 'target' not found in {path}; available columns: features, label")


def test_missing_feature_column_lists_available(tmp_path):
    path = scalar_csv(tmp_path)
    assert load_error(str(path), features=["f1", "f9"], label="y") == (
        f"dataset.features: column 'f9' not found in {path}; available columns: f1, f2, f3, y")


def test_missing_id_column(tmp_path):
    path = list_parquet(tmp_path)
    assert load_error(str(path), id_column="uid").startswith(f"dataset.id_column: column 'uid' not found in {path}")


def test_string_feature_column(tmp_path):
    path = write_csv(tmp_path / "d.csv", "f1,f2,label", "1,abc,0", "2,def,1")
    msg = load_error(str(path), features=["f1", "f2"])
    assert msg.startswith(f"dataset.features: columns ['f1', 'f2'] in {path} are not numeric")
    assert "could not convert string to float: 'abc'" in msg


def test_string_list_feature_column(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"features": pa.array([["a", "b"], ["c", "d"]]),
                                                  "label": pa.array([0, 1])})
    assert load_error(str(path)).startswith(f"dataset.features: columns ['features'] in {path} are not numeric")


def test_ragged_feature_lists(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"features": pa.array([[1.0, 2.0], [3.0]]),
                                                  "label": pa.array([0, 1])})
    assert "not numeric (or lists of unequal length)" in load_error(str(path))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_features(tmp_path, bad):
    x = X4.copy()
    x[2, 1] = bad
    path = write_parquet(tmp_path / "d.parquet", {"features": pa.array(x.tolist()), "label": pa.array(Y4)})
    assert load_error(str(path)) == f"dataset.features: row 2 of {path} holds NaN or Inf; clean the data first"


def test_empty_csv_cell_in_features_is_nan(tmp_path):
    path = write_csv(tmp_path / "d.csv", "f1,f2,label", "1,2,0", "3,,1")
    assert load_error(str(path), features=["f1", "f2"]) == \
        f"dataset.features: row 1 of {path} holds NaN or Inf; clean the data first"


def test_nan_beyond_limit_is_ignored(tmp_path):
    x = X4.copy()
    x[3, 0] = np.nan
    path = write_parquet(tmp_path / "d.parquet", {"features": pa.array(x.tolist()), "label": pa.array(Y4)})
    assert load_dataset(str(path), limit=3).num_rows == 3


def test_null_labels(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"features": pa.array(X4.tolist()),
                                                  "label": pa.array([0, None, 1, None], pa.int64())})
    assert load_error(str(path)) == f"dataset.label: column 'label' in {path} has 2 missing values"


def test_negative_labels(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"features": pa.array(X4.tolist()),
                                                  "label": pa.array([0, -1, 2, -3])})
    assert load_error(str(path)) == f"dataset.label: class ids must be >= 0 (found -3) in {path}"


def test_string_labels(tmp_path):
    path = write_csv(tmp_path / "d.csv", "f1,label", "1,cat", "2,dog")
    assert load_error(str(path), features=["f1"]) == \
        f"dataset.label: column 'label' in {path} must hold integer class ids"


def test_fractional_labels_are_refused(tmp_path):
    path = write_csv(tmp_path / "d.csv", "f1,label", "1,0", "2,1.5")
    assert load_error(str(path), features=["f1"]) == \
        f"dataset.label: column 'label' in {path} must hold integer class ids"


def test_non_unique_id_column(tmp_path):
    path = list_parquet(tmp_path, uid=pa.array(["a", "b", "a", "c"]))
    assert load_error(str(path), id_column="uid") == f"dataset.id_column: 'uid' in {path} is not unique"


# ---- ids, splits, fingerprints --------------------------------------------------------------


def test_content_ids_are_stable_and_dedup_repeats():
    x = np.array([[1, 2], [3, 4], [1, 2], [1, 2]], dtype=np.float32)
    ids = content_ids(x)
    assert ids[0] != ids[1]
    assert len(ids[0]) == 16
    assert ids[2] == ids[0] + "#1"
    assert ids[3] == ids[0] + "#2"
    assert content_ids(x) == ids
    assert content_ids(x.astype(np.float64)) == ids  # hashed as float32 either way


def test_duplicated_rows_in_a_file_get_unique_ids(tmp_path):
    x = np.vstack([X4, X4[1:2]])
    path = write_parquet(tmp_path / "d.parquet", {"features": pa.array(x.tolist()), "label": pa.array([*Y4, 1])})
    ids = load_dataset(str(path)).column("sample_id").to_pylist()
    assert ids[4] == ids[1] + "#1"
    assert len(set(ids)) == 5


@pytest.mark.parametrize("n, frac", [(1797, 0.3), (10, 0.25), (7, 0.5), (3, 0.1)])
def test_split_indices_partition(n, frac):
    train, test = split_indices(n, frac, seed=0)
    assert len(test) == int(round(n * frac))
    assert len(train) == n - len(test)
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(n))
    assert (np.diff(train) > 0).all() and (np.diff(test) > 0).all()


def test_split_indices_deterministic_per_seed():
    a_tr, a_te = split_indices(100, 0.3, seed=7)
    b_tr, b_te = split_indices(100, 0.3, seed=7)
    np.testing.assert_array_equal(a_tr, b_tr)
    np.testing.assert_array_equal(a_te, b_te)
    _, c_te = split_indices(100, 0.3, seed=8)
    assert not np.array_equal(a_te, c_te)


def test_fingerprint_stable_and_sensitive(digits):
    fp = fingerprint(digits)
    assert len(fp) == 16
    assert fingerprint(load_dataset("sklearn:digits")) == fp
    x = features_of(digits).copy()
    y = digits.column("label").to_numpy()
    ids = digits.column("sample_id").to_pylist()
    assert fingerprint(make_table(ids, x, y)) == fp
    x[500, 17] += 1
    assert fingerprint(make_table(ids, x, y)) != fp  # one feature value, same ids and labels


def test_fingerprint_sees_labels_and_ids():
    ids = ["a", "b", "c", "d"]
    fp = fingerprint(make_table(ids, X4, Y4))
    y = Y4.copy()
    y[0] = 3
    assert fingerprint(make_table(ids, X4, y)) != fp
    assert fingerprint(make_table(["a", "b", "c", "e"], X4, Y4)) != fp
    assert fingerprint(make_table(ids, X4, Y4)) == fp


def test_fingerprint_of_taken_rows_matches_a_fresh_table(digits):
    """The pipeline fingerprints `table.take(train_idx)`; equal content must give an equal hash."""
    train, _ = split_indices(digits.num_rows, 0.3, 0)
    taken = digits.take(train)
    fresh = make_table(taken.column("sample_id").to_pylist(), features_of(digits)[train],
                       digits.column("label").to_numpy()[train])
    assert fingerprint(taken) == fingerprint(fresh)
    assert fingerprint(digits.slice(5, 10)) == fingerprint(make_table(
        digits.column("sample_id").to_pylist()[5:15], features_of(digits)[5:15],
        digits.column("label").to_numpy()[5:15]))
