"""Labeling through a vLLM teacher on Ray Serve, beside an hf teacher on the same weights.

Its own module (so its own Ray): after the vLLM engine tests in test_vllm_teacher.py ran in
the same Ray, this labeling run hit vLLM's CPU-attention check "thread_num == thread_num
(2 vs. 1)" in the replica: an open problem, recorded in the issue notes.
"""
from __future__ import annotations

import pytest

from tests.test_vllm_teacher import K, _compare, tiny_llama, vllm_installed  # noqa: F401 (fixtures)
from tests.helpers_lm import corpus, write_instruct_files

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("fmt", ["text", "prompt_response"])
def test_labeling_through_a_vllm_teacher_on_serve(fmt, vllm_installed, tiny_llama, tmp_path, ray_local):
    """The whole labeling stage (Serve deploy, Ray Data labeler, top-k store) with a vLLM
    teacher beside an hf teacher on the same weights: their stored top-k must agree.

    prompt_response: the hf teacher scores packed rows (examples apart by position ids), the
    vLLM teacher each example as its own prompt; agreeing shows both keep examples apart and
    label the same (response) positions only."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from orchestrator import pipeline
    from orchestrator.config import config_from_dict
    from orchestrator.store import decode_topk
    from tests.helpers_lm import lm_config

    path, _ = tiny_llama
    texts = corpus()
    if fmt == "text":
        pq.write_table(pa.table({"text": texts[:10]}), tmp_path / "train.parquet")
        pq.write_table(pa.table({"text": texts[10:]}), tmp_path / "test.parquet")
    else:
        write_instruct_files(tmp_path)
        (tmp_path / "instruct_train.parquet").rename(tmp_path / "train.parquet")
        (tmp_path / "instruct_test.parquet").rename(tmp_path / "test.parquet")
    student = json.loads((path / "config.json").read_text())
    (tmp_path / "student.json").write_text(json.dumps(student))
    setup = {"teachers": {"hf": path}, "train": tmp_path / "train.parquet", "test": tmp_path / "test.parquet",
             "student_config": tmp_path / "student.json"}
    raw = lm_config(tmp_path, setup, lm={"max_len": 32, "k": K}, dataset={"format": fmt}, run={"name": fmt})
    raw["teachers"].append({"name": "vl", "backend": "vllm", "path": str(path), "num_cpus": 1, "max_batch_size": 16})
    cfg = config_from_dict(raw)
    store = pipeline.label(cfg, pipeline.prepare(cfg))
    assert store.complete and store.manifest["lm"]["vocab_size"] == student["vocab_size"]
    table = pq.ParquetDataset(store.shard_paths()).read()
    (hf_ids, hf_lps), (vl_ids, vl_lps) = decode_topk(table, "hf", K), decode_topk(table, "vl", K)
    overlap, diff = _compare(hf_ids, hf_lps, vl_ids, vl_lps)
    assert overlap >= 0.9 and diff <= 0.05, (overlap, diff)
    if fmt != "text":  # only the response positions are stored: one k-list per position whose next token carries loss
        import numpy as np

        from orchestrator.store import to_numpy
        expect = int(to_numpy(table.column("loss_mask"))[:, 1:].sum())
        assert hf_ids.shape == vl_ids.shape == (expect, K) and 0 < expect < table.num_rows * 31
        lengths = np.diff(table.column("teacher.vl.topk_ids").combine_chunks().offsets.to_numpy())
        np.testing.assert_array_equal(lengths, to_numpy(table.column("loss_mask"))[:, 1:].sum(1) * K)
