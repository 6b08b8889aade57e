"""LM teacher features end to end on real Ray / Serve / Train, on packed instruction rows: a Serve
teacher's hidden state stored per response token (float16, aligned with its top-k), `distill
inspect`'s bytes per token, an LM student trained with a hint term on Ray Train (2 workers), and
an export that loads with transformers and holds no projection weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator import pipeline
from orchestrator.cli import main
from orchestrator.config import config_from_dict
from orchestrator.instruct import rows_of, targets
from orchestrator.lm_features import decode_lm_feature
from orchestrator.models import CausalLMTeacher
from orchestrator.store import LabelStore, topk_columns
from tests.helpers_lm import lm_config, make_untrained_lm_setup, write_instruct_files

pytestmark = pytest.mark.slow
K = 8
TERM = {"kind": "hint", "weight": 0.5, "teacher": "large", "teacher_layer": 2, "student_layer": 1}


@pytest.fixture(scope="module")
def labeled(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("lmfeat")
    setup = make_untrained_lm_setup(root)  # the plumbing is under test, not what the teachers know
    train, test = write_instruct_files(root)
    raw = lm_config(root, setup, run={"name": "lmfeat"}, lm={"max_len": 64, "k": K},
                    dataset={"source": str(train), "test_source": str(test), "format": "prompt_response"},
                    train={"epochs": 1, "max_steps": 4, "batch_size": 4, "extra_losses": [TERM]},
                    eval={"baseline": False, "sample_max_new_tokens": 0})
    raw["teachers"][1].update(features=[2], pool="none")  # 'large': 2 layers, hidden 48
    cfg = config_from_dict(raw)
    pipeline.label(cfg, pipeline.prepare(cfg))
    return raw, cfg


def test_features_are_the_teachers_hidden_state_at_the_stored_positions(labeled, capsys):
    raw, cfg = labeled
    store = LabelStore(cfg.store_path)
    store.load_manifest()
    table = pq.ParquetFile(store.shard_paths()[0]).read()
    sel = targets(rows_of(table))
    stored = decode_lm_feature(table, "large", 2)
    assert stored.dtype == np.float16 and stored.shape == (int(sel.sum()), 48)  # one vector per labeled token
    lengths = np.diff(table.column("feat__large__2").combine_chunks().offsets.to_numpy())
    np.testing.assert_array_equal(lengths, sel.sum(1) * 48)  # row by row, as the top-k
    np.testing.assert_array_equal(np.diff(table.column(topk_columns("large")[0]).combine_chunks().offsets.to_numpy()),
                                  sel.sum(1) * K)
    teacher = CausalLMTeacher({**raw["teachers"][1], "features": [2], "pool": "none"}, K)
    _, _, want = teacher.forward_features(rows_of(table))  # the same model, here instead of on Serve
    np.testing.assert_allclose(stored.astype(np.float32), want["2"].astype(np.float32), atol=1e-2, rtol=1e-2)
    assert "feat__small__2" not in table.column_names  # 'small' captures nothing
    capsys.readouterr()
    assert main(["inspect", cfg.store_path]) == 0  # the text lines a user reads
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("features:   feat__large__2"))
    assert line.endswith(" per token") and "bytes per sample" in line
    assert main(["inspect", cfg.store_path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    per_sample, per_token = info["feature_bytes_per_sample"]["feat__large__2"], info["feature_bytes_per_token"]["feat__large__2"]
    rows = pq.ParquetFile(store.shard_paths()[0]).metadata.num_rows
    assert per_token == pytest.approx(per_sample * rows / sel.sum())  # per labeled position, first shard
    assert 0 < per_token <= 2 * 48 + 8  # float16 (zstd), a few bytes of list overhead at most


def test_trains_with_a_hint_term_and_exports_without_the_projection(labeled):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    _, cfg = labeled
    store = LabelStore(cfg.store_path)
    store.load_manifest()
    state = pipeline.train(cfg, pipeline.prepare(cfg), store, "student", cfg.train.loss, cfg.train.alpha,
                           extra_losses=cfg.train.extra_losses)
    (h,) = state["history"]
    label = "hint x0.5: large/2 -> student hidden state 1, projection 16->48"
    assert list(h["extra_losses"]) == [label] and 0 < h["extra_losses"][label] < 100, h
    assert "extra_terms" not in state  # the students/ state file holds the student only
    (ckpt,) = sorted((cfg.run_dir / "train").glob("student-*/checkpoint_*/state.pt"))[-1:]
    proj = torch.load(ckpt, weights_only=False)["extra_terms"]
    assert proj["losses.0.0.loss.proj.weight"].shape == (48, 16)  # student width 16 -> the teacher's 48
    model = AutoModelForCausalLM.from_pretrained(state["export"], local_files_only=True)
    export = Path(state["export"])
    names = [k for f in sorted(export.glob("*.safetensors")) for k in safe_open(str(f), "pt").keys()]
    assert names and not [k for k in names if k.startswith("losses") or ".loss." in k]  # no projection
    assert set(names) <= set(model.state_dict()) and json.loads((export / "config.json").read_text())["hidden_size"] == 16
