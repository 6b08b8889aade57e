"""The causal-LM path end to end on real Ray: HF teachers on Serve, top-k store, LM student."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator import codec, pipeline
from orchestrator.cli import main
from orchestrator.config import config_from_dict
from orchestrator.ensemble import ensemble_topk
from orchestrator.errors import DistillError
from orchestrator.store import LabelStore, decode_topk, topk_columns
from tests.helpers import write_yaml
from tests.helpers_lm import lm_config, make_lm, make_lm_setup, make_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    return make_lm_setup(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def lm_run(ray_local, lm_setup, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmrun")
    cfg = config_from_dict(lm_config(tmp, lm_setup))
    return cfg, pipeline.run(cfg)


def test_topk_store_rows_types_and_soft_labels(lm_run, lm_setup):
    cfg, _ = lm_run
    prep = pipeline.prepare(cfg)
    store = LabelStore(cfg.store_path)
    store.load_manifest()
    table = pq.ParquetDataset(store.shard_paths()).read()
    assert sorted(table.column("sample_id").to_pylist()) == sorted(prep.train.column("sample_id").to_pylist())
    k, positions = 8, cfg.lm.max_len - 1
    for who in ("small", "large", "soft"):
        ids_col, lps_col = topk_columns(who)
        # schema version 2 (orchestrator/codec.py): gap-coded ids, k + 1 uint8 codes per position
        for col, want, width in ((ids_col, pa.int16(), k), (lps_col, pa.uint8(), k + 1)):
            t = table.schema.field(col).type
            assert (t.value_type, t.list_size) == (want, positions * width)
    # Stored soft labels are the configured top-k ensemble of the stored teacher labels.
    ids = np.stack([decode_topk(table, n, k)[0].reshape(-1, k) for n in ("small", "large")])
    lps = np.stack([decode_topk(table, n, k)[1].reshape(-1, k) for n in ("small", "large")])
    e_ids, e_lps, _ = ensemble_topk(ids, lps, k_out=k, vocab_size=store.manifest["lm"]["vocab_size"],
                                    mode="mean_prob", temperature=2.0)
    # The labeler ensembles the decoded labels it stores, so recomputing (and storing) is exact.
    s_ids, s_lps = decode_topk(table, "soft", k)
    want_ids, want_lps = codec.roundtrip(e_ids, e_lps)
    np.testing.assert_array_equal(s_ids.reshape(-1, k), want_ids)
    np.testing.assert_array_equal(s_lps.reshape(-1, k), want_lps)


def test_reensemble_topk_store_without_teachers(lm_run, monkeypatch):
    cfg, _ = lm_run
    import actors.teacher

    monkeypatch.setattr(actors.teacher, "deploy", lambda *a, **k: (_ for _ in ()).throw(AssertionError("deployed")))
    store = LabelStore(cfg.store_path)
    store.load_manifest()
    before = {p: open(p, "rb").read() for p in store.shard_paths()}
    changed = cfg.model_copy(deep=True)
    changed.ensemble.mode, changed.teachers[1].weight = "ca_mkd", 3.0
    pipeline.label(changed, pipeline.prepare(changed), reensemble=True)
    table = pq.ParquetDataset(store.shard_paths()).read()
    k, vocab = cfg.lm.k, store.manifest["lm"]["vocab_size"]
    ids = np.stack([decode_topk(table, n, k)[0].reshape(-1, k) for n in ("small", "large")])
    lps = np.stack([decode_topk(table, n, k)[1].reshape(-1, k) for n in ("small", "large")])
    windows = np.stack(table.column("input_ids").to_numpy(zero_copy_only=False))
    e_ids, e_lps, _ = ensemble_topk(ids, lps, k_out=k, vocab_size=vocab, mode="ca_mkd", temperature=2.0,
                                    weights=[1.0, 3.0], labels=windows[:, 1:].reshape(-1))
    np.testing.assert_array_equal(decode_topk(table, "soft", k)[0].reshape(-1, k), codec.roundtrip(e_ids, e_lps)[0])
    assert LabelStore(cfg.store_path).load_manifest()["ensemble"]["mode"] == "ca_mkd"
    # Back to the original settings: the shards are byte-identical to the labeled ones.
    pipeline.label(cfg, pipeline.prepare(cfg), reensemble=True)
    assert {p: open(p, "rb").read() for p in before} == before
    bpt = store.bytes_per_token()
    assert set(bpt) == {"small", "large", "soft"} and all(0 < v < k * 4 for v in bpt.values())


def test_lm_report(lm_run):
    cfg, out = lm_run
    report = json.loads((cfg.run_dir / "report.json").read_text())
    assert report["task"] == "lm"
    assert set(report["models"]) == {"small", "large", "ensemble", "student", "student_hard"}
    vocab = 300
    for m in report["models"].values():
        assert 1.0 < m["perplexity"] < vocab * 2 and isinstance(m["params"], int)
    # The teachers learned something: clearly better than a uniform guess over the vocabulary.
    assert report["models"]["large"]["perplexity"] < vocab / 3
    assert "approximation" in report["models"]["ensemble"]


def test_inspect_shows_bytes_per_token(lm_run, capsys):
    cfg, _ = lm_run
    assert main(["inspect", cfg.store_path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["label_kind"] == "topk" and info["k"] == 8 and info["bytes_per_token"]["soft"] > 0


def test_teachers_with_different_vocabularies_are_refused(lm_setup, tmp_path):
    from tests.helpers_lm import corpus

    other_tok = make_tokenizer(tmp_path / "tok2", corpus(6), vocab=280)
    other = make_lm(tmp_path / "other", other_tok, corpus(6), 32, 1, seed=5, steps=1)
    raw = lm_config(tmp_path, lm_setup)
    raw["teachers"][1]["path"] = str(other)
    cfg = config_from_dict(raw)
    with pytest.raises(DistillError, match=r"teachers 'small' and 'large' use different vocabularies"):
        pipeline.prepare(cfg)
    code = main(["label", str(write_yaml(tmp_path / "c.yaml", raw))])
    assert code == 2 and not LabelStore(cfg.store_path).exists()
