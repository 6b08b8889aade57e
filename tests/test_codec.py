"""The top-k codec (orchestrator/codec.py) and the version-3 store around it: round trips,
KL bound, padding, version-1 and version-2 shards, soft columns by reference, re-ensembling bit
for bit."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import codec
from orchestrator.ensemble import _soften_topk
from orchestrator.soft_labels import build_shard, stored_outputs
from orchestrator.store import LabelStore, decode_topk, topk_columns

V = 1000


def random_topk(rng, n, k, vocab=V, sharp=False):
    """Sorted-descending top-k of random distributions over `vocab` tokens."""
    logits = rng.normal(size=(n, vocab)) * (8.0 if sharp else 2.0)
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ids = np.argsort(-lp, axis=1)[:, :k]
    return ids, np.take_along_axis(lp, ids, 1).astype(np.float32)


def kl_topk(ids_a, lp_a, ids_b, lp_b):
    """KL over the k listed tokens + tail, matching b's entries to a's by id."""
    ia, ib = np.argsort(ids_a, 1), np.argsort(ids_b, 1)
    assert (np.take_along_axis(ids_a, ia, 1) == np.take_along_axis(ids_b, ib, 1)).all()
    a = _soften_topk(np.take_along_axis(lp_a, ia, 1).astype(np.float64)[None], 1.0)[0]
    b = _soften_topk(np.take_along_axis(lp_b, ib, 1).astype(np.float64)[None], 1.0)[0]
    return (np.exp(a) * (a - b)).sum(-1)


def test_levels_keep_the_kl_bound_at_every_k():
    # smallest L with L^2 >= 240 (k + 1): 2160 -> 47 (46^2 = 2116), 4080 -> 64, 7920 -> 89, 15600 -> 125
    assert [codec.levels(k) for k in (8, 16, 32, 64)] == [47, 64, 89, 125]
    assert all(codec.kl_bound(k) <= codec.KL_BUDGET for k in range(1, 270))
    assert codec.levels(1000) == 255  # the uint8 ceiling


def test_hand_encoded_position():
    # k=2: L = 27 (27^2 = 729 >= 720). p = 0.5, 0.3 on ids 7, 3; tail 0.2.
    # sqrt * 27: 0.3 -> 14.79 -> 15, 0.5 -> 19.09 -> 19, 0.2 -> 12.07 -> 12
    gaps, codes = codec.encode(np.array([[7, 3]]), np.log(np.array([[0.5, 0.3]])))
    assert gaps.tolist() == [[4, 4]] and gaps.dtype == np.uint32  # ids ascending: 3 (gap 4 from -1), 7
    assert codes.tolist() == [[15, 19, 12]] and codes.dtype == np.uint8
    ids, lps = codec.decode(gaps, codes)
    q = np.array([15, 19, 12]) ** 2 / 27**2
    assert ids.tolist() == [[3, 7]]
    np.testing.assert_allclose(np.exp(lps), [q[:2] / q.sum()], rtol=1e-6)


def test_gaps_are_bit_shuffled_by_hand():
    # gap 1000 = 31 * 32 + 8: byte 1 = 31, byte 0 = 8 -> 7944.
    # gap 40000 = 4 * 8192 + 226 * 32 + 0: byte 1 = 226, byte 0 = 0 | 4 << 5 = 128 -> 57984.
    gaps, _ = codec.encode(np.array([[1002, 2, 41002]]), np.log(np.full((1, 3), 0.3)))
    assert gaps.tolist() == [[3, 7944, 57984]]
    assert codec.decode(gaps, _)[0].tolist() == [[2, 1002, 41002]]
    # bits from 16 up stay where they are (vocabularies over 65535, uint32 columns)
    g = np.array([70_000, 1 << 30])
    assert codec._shuffle(g).tolist() == [(70_000 & 0x1F) | (70_000 >> 5 & 0xFF) << 8 | (70_000 >> 13 & 7) << 5 | 65536,
                                         1 << 30]
    x = np.arange(1 << 17)
    assert np.array_equal(codec._unshuffle(codec._shuffle(x)), x) and len(np.unique(codec._shuffle(x))) == len(x)


@pytest.mark.parametrize("k", [1, 8, 16, 32, 64])
@pytest.mark.parametrize("sharp", [False, True])
def test_round_trip_keeps_ids_and_kl_under_bound(k, sharp):
    rng = np.random.default_rng(k + sharp)
    ids, lps = random_topk(rng, 500, k, sharp=sharp)
    d_ids, d_lps = codec.roundtrip(ids, lps)
    assert d_ids.dtype == np.int64 and d_lps.dtype == np.float32 and d_ids.shape == ids.shape
    assert (np.diff(d_ids, axis=1) > 0).all()  # ascending, same set (kl_topk checks the set)
    assert np.exp(d_lps).sum(1).max() <= 1.0 + 1e-6
    kl = kl_topk(ids, lps, d_ids, d_lps)
    # the stated bound: (k + 1) / (6 * levels(k)^2) <= KL_BUDGET on average, every position within 4x of it
    bound = codec.kl_bound(k)
    assert kl.mean() <= bound and kl.max() <= 4 * bound


@st.composite
def topk_rows(draw):
    """A few positions of k distinct ids (some padding at the end) with probabilities summing to <= 1."""
    k = draw(st.integers(1, 40))
    vocab = draw(st.sampled_from([k + 1, 1000, 32_000, 70_000, 200_000]))
    n = draw(st.integers(1, 4))
    ids, lps = np.full((n, k), -1, np.int64), np.full((n, k), codec.PAD_LOGPROB, np.float32)
    for r in range(n):
        m = draw(st.integers(1, k))
        row = draw(st.lists(st.integers(0, vocab - 1), min_size=m, max_size=m, unique=True))
        w = np.array(draw(st.lists(st.floats(1e-6, 1.0), min_size=m + 1, max_size=m + 1)))
        ids[r, :m], lps[r, :m] = row, np.log(w[:m] / w.sum())
    return ids, lps


@settings(max_examples=300, deadline=None)
@given(topk_rows())
def test_round_trip_property(rows):
    ids, lps = rows
    gaps, codes = codec.encode(ids, lps)
    assert codec.is_current(gaps, codes) and gaps.shape == ids.shape and codes.shape == (len(ids), ids.shape[1] + 1)
    d_ids, d_lps = codec.decode(gaps, codes)
    pad = ids < 0
    for r in range(len(ids)):  # the same set of ids, ascending, padding last
        real = np.sort(ids[r][~pad[r]])
        assert d_ids[r].tolist() == real.tolist() + [-1] * int(pad[r].sum())
    d_pad = d_ids < 0
    assert (d_lps[d_pad] == codec.PAD_LOGPROB).all() and np.isfinite(d_lps[~d_pad]).all()
    assert (np.exp(d_lps).sum(1) <= 1 + 1e-5).all()
    # every decoded sqrt(p) within half a level of the true one, up to the renormalisation
    s = np.sqrt(np.exp(np.sort(np.where(pad, -np.inf, lps), 1)))
    d = np.sqrt(np.exp(np.sort(np.where(d_pad, -np.inf, d_lps), 1)))
    assert np.abs(s - d).max() <= 1.0 / codec.levels(ids.shape[1]) + 0.02


def test_re_encoding_stored_codes_is_stable_enough_to_keep_them():
    # build_shard keeps stored codes as they are; decoding twice gives the same arrays.
    rng = np.random.default_rng(0)
    coded = codec.encode(*random_topk(rng, 50, 16))
    a, b = codec.decode(*coded), codec.decode(*coded)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_padding_round_trips_as_padding():
    ids = np.array([[5, 2, -1, -1]])
    lps = np.array([[np.log(0.6), np.log(0.3), codec.PAD_LOGPROB, codec.PAD_LOGPROB]], np.float32)
    gaps, codes = codec.encode(ids, lps)
    assert gaps.tolist() == [[3, 3, 0, 0]]
    d_ids, d_lps = codec.decode(gaps, codes)
    assert d_ids.tolist() == [[2, 5, -1, -1]]
    assert d_lps[0, 2:].tolist() == [codec.PAD_LOGPROB] * 2 and np.exp(d_lps[0, 2:]).sum() == 0
    np.testing.assert_allclose(np.exp(d_lps[0, :2]), [0.3, 0.6], atol=0.01)


def test_version_1_columns_decode_as_stored():
    ids = np.array([[4, 1]])
    lps = np.log(np.array([[0.5, 0.2]])).astype(np.float16)
    d_ids, d_lps = codec.decode(ids, lps)
    assert d_ids.tolist() == [[4, 1]] and d_lps.dtype == np.float32
    np.testing.assert_array_equal(d_lps, lps.astype(np.float32))


# ---- the store ----------------------------------------------------------------------------


def lm_manifest(names, k, temperature=1.0, mode="mean_prob", length=5):
    return {"label_kind": "topk", "k": k, "lm": {"vocab_size": V, "max_len": length}, "teachers": [{"name": n} for n in names],
            "ensemble": {"mode": mode, "temperature": temperature, "tau": 1.0, "weights": {n: 1.0 for n in names}}}


def lm_inputs(windows, length, rng):
    """Window rows as the labeler reads them: through Parquet (list children named 'element')."""
    tokens = rng.integers(0, V, (windows, length)).astype(np.int32)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"sample_id": pa.array([f"w{i}" for i in range(windows)]),
                     "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), length),
                     "row": pa.array(np.arange(windows), pa.int64())}), sink)
    return pq.read_table(pa.BufferReader(sink.getvalue()))


def teacher_outputs(names, windows, length, k, rng):
    out = {}
    for n in names:
        ids, lps = random_topk(rng, windows * (length - 1), k)
        out[n] = (ids.reshape(windows, length - 1, k), lps.reshape(windows, length - 1, k))
    return out


def open_store(tmp_path, manifest, rows):
    store = LabelStore(str(tmp_path / "store"))
    store.manifest = {**manifest, "dataset": {"rows": rows}, "shard_size": rows, "shards": {},
                      "teachers": [{"name": n} for n in manifest["ensemble"]["weights"]]}
    return store


def test_reensembling_stored_outputs_reproduces_the_shard_bit_for_bit(tmp_path):
    rng = np.random.default_rng(1)
    names, k = ["a", "b"], 8
    manifest = lm_manifest(names, k)
    inputs = lm_inputs(3, 5, rng)
    table, _ = build_shard(inputs, teacher_outputs(names, 3, 5, k, rng), manifest)
    store = open_store(tmp_path, manifest, 3)
    first = store.write_shard(0, table)
    store.record_finished()
    again, _ = build_shard(*stored_outputs(store.read_shard(0), manifest), manifest)
    assert store.write_shard(0, again) == first  # same bytes, same checksum


def test_soft_labels_are_the_ensemble_of_the_decoded_teachers():
    rng = np.random.default_rng(2)
    names, k = ["a", "b"], 4
    manifest = lm_manifest(names, k)
    outputs = teacher_outputs(names, 2, 5, k, rng)
    table, _ = build_shard(lm_inputs(2, 5, rng), outputs, manifest)
    from orchestrator.ensemble import ensemble_topk

    dec = [codec.roundtrip(*(x.reshape(-1, k) for x in outputs[n])) for n in names]
    s_ids, s_lps, _ = ensemble_topk(np.stack([d[0] for d in dec]), np.stack([d[1] for d in dec]), k_out=k,
                                    vocab_size=V, mode="mean_prob", temperature=1.0, weights=[1.0, 1.0])
    want = codec.roundtrip(s_ids, s_lps)
    got = decode_topk(table, "soft", k)
    np.testing.assert_array_equal(got[0].reshape(-1, k), want[0])
    np.testing.assert_array_equal(got[1].reshape(-1, k), want[1])


def test_one_teacher_at_t1_stores_soft_columns_once_and_reads_resolve_them(tmp_path):
    rng = np.random.default_rng(3)
    k, manifest = 4, lm_manifest(["only"], 4)
    table, _ = build_shard(lm_inputs(3, 5, rng), teacher_outputs(["only"], 3, 5, k, rng), manifest)
    assert not set(topk_columns("soft")) & set(table.column_names)  # not stored twice
    store = open_store(tmp_path, manifest, 3)
    store.write_shard(0, table)
    store.record_finished()
    on_disk = pq.read_schema(store.shard_path(0))
    assert on_disk.metadata[b"distill.soft_same_as"] == b"only"
    shard = store.read_shard(0)
    for soft, teacher in zip(topk_columns("soft"), topk_columns("only")):
        assert shard.column(soft).equals(shard.column(teacher))
    cols = ["input_ids", *topk_columns("soft")]
    read = store.read_table(cols)
    assert read.column_names == cols and read.column(cols[1]).equals(shard.column(topk_columns("only")[0]))
    assert store.parquet_columns(cols) == (["input_ids", *topk_columns("only")],
                                           dict(zip(topk_columns("only"), topk_columns("soft"))))
    m = {**store.manifest, "teachers": [{"name": "only"}], "lm": manifest["lm"]}
    store.manifest = m
    per = store.bytes_per_token()
    assert per["soft"] == per["only"] > 0
    # the ensemble of the one teacher is the teacher, to float rounding
    from orchestrator.ensemble import ensemble_topk

    t_ids, t_lps = decode_topk(shard, "only", k)
    e_ids, e_lps, _ = ensemble_topk(t_ids.reshape(1, -1, k), t_lps.reshape(1, -1, k), k_out=k, vocab_size=V,
                                    mode="mean_prob", temperature=1.0, weights=[1.0])
    np.testing.assert_allclose(np.exp(np.sort(e_lps, 1)), np.exp(np.sort(t_lps.reshape(-1, k), 1)), atol=1e-6)
    # at T=2 the soft labels differ from the teacher's, so they are stored
    t2 = lm_manifest(["only"], k, temperature=2.0)
    table2, _ = build_shard(*stored_outputs(shard, t2), t2)
    assert set(topk_columns("soft")) <= set(table2.column_names)
    assert b"distill.soft_same_as" not in (table2.schema.metadata or {})


def test_a_version_1_shard_still_reads(tmp_path):
    """A shard as schema version 1 wrote it: ids in probability order, float16 log-probs,
    BYTE_STREAM_SPLIT + zstd, sha256 in the sidecar and manifest."""
    import hashlib

    rng = np.random.default_rng(4)
    k, b, length = 4, 2, 5
    ids, lps = random_topk(rng, b * (length - 1), k)
    inputs = lm_inputs(b, length, rng)
    t = inputs
    for name in ("a", "soft"):
        ic, lc = topk_columns(name)
        t = t.append_column(ic, pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1).astype(np.int16)), (length - 1) * k))
        t = t.append_column(lc, pa.FixedSizeListArray.from_arrays(
            pa.array(lps.reshape(-1).astype(np.float16), pa.float16()), (length - 1) * k))
    store = open_store(tmp_path, lm_manifest(["a"], k), b)
    path = tmp_path / "store" / "shards" / "shard-00000.parquet"
    path.parent.mkdir(parents=True)
    cols = [f"{c}.list.element" for c in (*topk_columns("a"), *topk_columns("soft"))]
    pq.write_table(t, path, compression="zstd", use_dictionary=False, use_byte_stream_split=cols)
    data = path.read_bytes()
    path.with_suffix(".json").write_text(json.dumps({"rows": b, "bytes": len(data),
                                                     "sha256": hashlib.sha256(data).hexdigest()}))
    assert store.record_finished() == []
    shard = store.read_shard(0)
    got_ids, got_lps = decode_topk(shard, "a", k)
    np.testing.assert_array_equal(got_ids.reshape(-1, k), ids)
    np.testing.assert_array_equal(got_lps.reshape(-1, k), lps.astype(np.float16).astype(np.float32))
    # altered bytes fail the sha256 check of a version-1 sidecar too
    path.write_bytes(data[:-8] + b"\0" * 8)
    assert store.record_finished() == [0]


def v2_encode(ids, lps):
    """Schema version 2's codes, as that codec wrote them: plain gaps, round(127 sqrt(p))."""
    order = np.argsort(ids, 1)
    s_ids, p = np.take_along_axis(ids, order, 1), np.exp(np.take_along_axis(lps.astype(np.float64), order, 1))
    tail = np.clip(1 - p.sum(1, keepdims=True), 0, 1)
    return np.diff(s_ids, axis=1, prepend=-1), np.rint(127 * np.sqrt(np.concatenate([p, tail], 1))).astype(np.uint8)


def test_version_2_codes_decode_with_their_127_levels():
    # p = 0.5, 0.25 on ids 7, 3; tail 0.25: codes 90, 64, 64 of 127 (the version-2 hand example)
    gaps, codes = np.array([[4, 4]], np.int16), np.array([[64, 90, 64]], np.uint8)
    assert not codec.is_current(gaps, codes) and codec.is_coded(codes)
    ids, lps = codec.decode(gaps, codes)
    q = np.array([64, 90, 64]) ** 2 / 127**2
    assert ids.tolist() == [[3, 7]]
    np.testing.assert_allclose(np.exp(lps), [q[:2] / q.sum()], rtol=1e-6)


def test_a_version_2_shard_still_reads_and_re_encodes_as_version_3(tmp_path):
    """A shard as schema version 2 wrote it: int16 plain gaps, uint8 codes of 127 levels
    (dictionary-encoded), zstd; decoded as stored, and re-ensembled into version-3 columns."""
    rng = np.random.default_rng(5)
    k, b, length = 4, 2, 5
    ids, lps = random_topk(rng, b * (length - 1), k)
    gaps, codes = v2_encode(ids, lps)
    t = lm_inputs(b, length, rng)
    ic, lc = topk_columns("a")
    fixed = pa.FixedSizeListArray.from_arrays
    t = t.append_column(ic, fixed(pa.array(gaps.reshape(-1).astype(np.int16)), (length - 1) * k))
    t = t.append_column(lc, fixed(pa.array(codes.reshape(-1)), (length - 1) * (k + 1)))
    t = t.replace_schema_metadata({b"distill.soft_same_as": b"a"})
    manifest = lm_manifest(["a"], k)
    store = open_store(tmp_path, manifest, b)
    path = tmp_path / "store" / "shards" / "shard-00000.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(t, path, compression="zstd", use_dictionary=[f"{lc}.list.element"],
                   use_byte_stream_split=[f"{ic}.list.element"])
    data = path.read_bytes()
    path.with_suffix(".json").write_text(json.dumps({"rows": b, "bytes": len(data),
                                                     "checksum": f"xxh3_128:{xxhash.xxh3_128_hexdigest(data)}"}))
    assert store.record_finished() == []
    shard = store.read_shard(0)
    want = codec.decode(gaps, codes)
    for name in ("a", "soft"):  # soft by reference, as version 2 wrote one teacher at T=1
        got_ids, got_lps = decode_topk(shard, name, k)
        np.testing.assert_array_equal(got_ids.reshape(-1, k), want[0])
        np.testing.assert_array_equal(got_lps.reshape(-1, k), want[1])
    np.testing.assert_array_equal(want[0], np.sort(ids, 1))
    assert kl_topk(ids, lps, *want).mean() <= 1.5 * (k + 1) / (6 * 127**2)  # version 2 stated (k + 1) / (6 * 127^2)
    # re-ensembling the old shard writes version-3 columns that decode to the re-encoded labels
    again, _ = build_shard(*stored_outputs(shard, manifest), manifest)
    assert again.column(ic).type.value_type == pa.uint16()
    v3 = decode_topk(again, "a", k)
    np.testing.assert_array_equal(v3[0].reshape(-1, k), want[0])
    np.testing.assert_array_equal(v3[1].reshape(-1, k), codec.roundtrip(*want)[1])
