"""Instruction data end to end on real Ray: chat examples packed with a loss mask, HF teachers on
Serve labeling only the assistant positions, a teacher-initialised student, the report and the
exported student, all over the same (assistant) tokens."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from orchestrator import pipeline
from orchestrator.cli import main
from orchestrator.config import config_from_dict
from orchestrator.instruct import rows_of, targets
from orchestrator.store import LabelStore, to_numpy, topk_columns
from tests.helpers_lm import lm_config, write_instruct_files

pytestmark = pytest.mark.slow
K = 8


@pytest.fixture(scope="module")
def chat_run(ray_local, lm_setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    setup = lm_setup  # tests/conftest.py: the LM teachers, trained once per session
    train, test = write_instruct_files(root)
    raw = lm_config(root, setup, run={"name": "chat"}, lm={"max_len": 64, "k": K, "student_config": None},
                    dataset={"source": str(train), "test_source": str(test), "format": "chat"},
                    student={"init": "teacher", "teacher": "large", "layers": [1]},
                    # no teacher_nll_of_samples here: no teacher redeploy at eval; no hard-label baseline
                    # (another Ray Train run: test_lm's report checks it)
                    eval={"sample_max_new_tokens": 0, "baseline": False})
    cfg = config_from_dict(raw)
    return cfg, pipeline.run(cfg, quiet=True)


def test_the_store_keeps_the_assistant_positions_only(chat_run):
    cfg, _ = chat_run
    import pyarrow.parquet as pq

    store = LabelStore(cfg.store_path)
    store.load_manifest()
    table = pq.ParquetDataset(store.shard_paths()).read()
    sel = targets(rows_of(table))
    assert 0 < sel.sum() < sel.size / 2  # the prompts (and the template's user turns) are not labeled
    for name in ("small", "large", "soft"):
        lengths = np.diff(table.column(topk_columns(name)[0]).combine_chunks().offsets.to_numpy())
        np.testing.assert_array_equal(lengths, sel.sum(1) * K)
    assert store.bytes_per_token()["soft"] > 0


def test_report_perplexities_are_over_the_assistant_tokens(chat_run):
    """Each teacher's reported NLL equals its mean NLL over the held-out assistant tokens,
    each example scored alone (no packing); the ensemble's is exact and the students train."""
    from orchestrator.models import CausalLMTeacher

    cfg, _ = chat_run
    report = json.loads((cfg.run_dir / "report.json").read_text())
    test = pipeline.prepare(cfg).test
    rows = rows_of(test)
    assert report["test_tokens"] == int(targets(rows).sum())
    teacher = CausalLMTeacher(next(t.model_dump() for t in cfg.teachers if t.name == "large"), K)
    nll = []
    for r in rows:  # unpack each example and score it on its own
        starts = np.r_[np.flatnonzero(r[1] == 0), r.shape[1]]
        for s, e in zip(starts[:-1], starts[1:]):
            if r[2, s + 1:e].any():
                alone = teacher.nll(r[0, s:e][None])[0]
                nll += alone[r[2, s + 1:e].astype(bool)].tolist()
    assert abs(np.mean(nll) - report["models"]["large"]["nll"]) < 1e-4
    assert "approximation" not in report["models"]["ensemble"]
    assert np.isfinite(report["models"]["student"]["nll"])


def test_exported_student_reproduces_the_reported_nll_on_packed_rows(chat_run):
    from transformers import AutoModelForCausalLM

    cfg, _ = chat_run
    report = json.loads((cfg.run_dir / "report.json").read_text())
    rows = torch.from_numpy(rows_of(pipeline.prepare(cfg).test).astype(np.int64))
    model = AutoModelForCausalLM.from_pretrained(str(cfg.run_dir / "students" / "student"), local_files_only=True).eval()
    with torch.inference_mode():
        logits = model(input_ids=rows[:, 0], position_ids=rows[:, 1], use_cache=False).logits[:, :-1].float()
    sel = rows[:, 2, 1:].bool()
    nll = torch.nn.functional.cross_entropy(logits[sel], rows[:, 0, 1:][sel]).item()
    assert abs(nll - report["models"]["student"]["nll"]) < 1e-3


def test_inspect_reports_bytes_per_labeled_token(chat_run, capsys):
    cfg, _ = chat_run
    assert main(["inspect", cfg.store_path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    store = LabelStore(cfg.store_path)
    store.load_manifest()
    mask = to_numpy(store.read_table(["loss_mask"]).column("loss_mask"))
    import pyarrow.parquet as pq

    from orchestrator.columns import column_sizes

    first = pq.ParquetFile(store.shard_paths()[0])
    labeled = int(to_numpy(first.read(["loss_mask"]).column(0))[:, 1:].sum())
    soft = sum(column_sizes(first.metadata)[c] for c in topk_columns("soft"))
    assert info["bytes_per_token"]["soft"] == pytest.approx(soft / labeled)  # per labeled position, not per slot
    assert labeled < first.metadata.num_rows * 63 and mask.shape[1] == 64


def test_reensemble_of_a_packed_store_needs_no_teacher(chat_run, tmp_path):
    """--reensemble on ragged (assistant-only) columns: same positions, new soft labels."""
    import shutil

    import pyarrow.parquet as pq

    from tests.helpers import write_yaml

    cfg, _ = chat_run
    raw = cfg.model_dump(mode="json")
    raw["store"]["path"] = str(tmp_path / "store")
    shutil.copytree(cfg.store_path, tmp_path / "store")
    raw["ensemble"]["temperature"] = 1.0
    assert main(["-q", "label", str(write_yaml(tmp_path / "c.yaml", raw)), "--reensemble"]) == 0
    store = LabelStore(str(tmp_path / "store"))
    store.load_manifest()
    before, after = (pq.ParquetDataset(s.shard_paths()).read() for s in (_opened(cfg.store_path), store))
    soft = topk_columns("soft")[0]
    assert before.column(soft).combine_chunks().offsets.equals(after.column(soft).combine_chunks().offsets)
    assert not before.column(topk_columns("soft")[1]).equals(after.column(topk_columns("soft")[1]))
    for name in ("small", "large"):  # the teachers' own columns are kept as they were
        assert before.column(topk_columns(name)[1]).equals(after.column(topk_columns(name)[1]))


def _opened(uri: str) -> LabelStore:
    store = LabelStore(uri)
    store.load_manifest()
    return store
