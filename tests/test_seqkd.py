"""Training on teacher-generated data, end to end on real Ray Serve with two tiny instruction teachers:

  distill generate                   -> generate.json holds each teacher's generation throughput
  generate.include_reference         -> re-curated (no teacher) into generated answers + the reference ones
  distill run on the mixed file      -> report.json has teacher_nll_of_samples for every student,
                                        equal to an in-process recomputation (the student's greedy
                                        answers, both teachers' NLLs mixed by their weights)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator.cli import main
from orchestrator.config import config_from_dict
from tests.helpers import write_yaml
from tests.helpers_gen import sample_nll_in_process
from tests.helpers_lm import lm_config

pytestmark = pytest.mark.slow
MAX_NEW, SAMPLE_NEW = 24, 12


@pytest.fixture(scope="module")
def setup(gen_setup):
    return gen_setup  # tests/conftest.py: the instruction teachers, trained once per session


def _config(tmp: Path, setup: dict) -> dict:
    cfg = lm_config(tmp, setup, run={"name": "seqkd"},
                    dataset={"source": str(setup["train"]), "test_source": str(setup["test"]), "format": "prompt_response"},
                    lm={"max_len": 64, "k": 4}, ray={"num_cpus": 2},
                    generate={"n": 1, "max_new_tokens": MAX_NEW, "temperature": 0.8, "seed": 5, "block_size": 18})
    cfg["teachers"][0]["weight"] = 3.0  # unequal weights: the recomputation below must use them
    cfg["train"].update(epochs=1, workers=1, cpus_per_worker=1)
    # No hard-label baseline: its sampled answers are scored by the same code as the student's, and
    # it is one more Ray Train run (test_lm checks the baseline's report).
    cfg["eval"] = {"baseline": False, "sample_max_new_tokens": SAMPLE_NEW}
    return cfg


def test_generated_plus_reference_data_trains_students_scored_by_the_teachers_on_their_own_answers(setup, tmp_path):
    cfg = _config(tmp_path, setup)
    path = write_yaml(tmp_path / "c.yaml", cfg)
    out = Path(cfg["output_dir"]) / "seqkd" / "generated"
    assert main(["generate", str(path), "-q"]) == 0

    # Throughput per teacher: every generated token counted once, for the teacher that wrote it.
    manifest = json.loads((out / "generate.json").read_text())
    parts = [r for p in sorted((out / "parts").rglob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    for t in ("small", "large"):
        rate = manifest["throughput"][t]
        assert rate["tokens"] == sum(len(r["response_ids"]) for r in parts if r["teacher"] == t) > 0
        assert rate["seconds"] > 0 and rate["tokens_per_s"] == pytest.approx(rate["tokens"] / rate["seconds"])
    generated = pq.read_table(out / "generated.parquet").to_pylist()
    assert {r["origin"] for r in generated} == {"teacher"}

    # Mixing: re-curated with the reference answers; no teacher runs (an unreachable Ray would fail).
    assert main(["generate", str(path), "-q", "generate.include_reference=true", "ray.address=ray://nowhere:1"]) == 0
    mixed = pq.read_table(out / "generated.parquet").to_pylist()
    source = pq.read_table(setup["train"]).to_pylist()
    refs = [r for r in mixed if r["origin"] == "reference"]
    assert [(r["prompt"], r["response"]) for r in refs] == [(s["prompt"], s["response"]) for s in source]
    assert all(r["teacher"] is None and r["sample_id"].endswith("/reference") for r in refs)
    assert [r for r in mixed if r["origin"] == "teacher"] == sorted(
        generated, key=lambda r: [s["prompt"] for s in source].index(r["prompt"]))  # the same rows, by prompt
    assert json.loads((out / "generate.json").read_text())["throughput"] == manifest["throughput"]  # kept
    firsts = {}
    for i, r in enumerate(mixed):
        firsts.setdefault(r["prompt_id"], r["origin"])
    assert set(firsts.values()) == {"reference"}  # each prompt's reference answer comes first

    # distill run on the mixed data: every student has teacher_nll_of_samples beside its perplexity.
    # The teachers take both of the cluster's CPUs: evaluation runs the students' tasks (scores,
    # answers) before it deploys them again, or those tasks would wait for a CPU for ever.
    run_cfg = {**cfg, "dataset": {**cfg["dataset"], "source": str(out / "generated.parquet")},
               "teachers": [{**t, "num_cpus": 1.0} for t in cfg["teachers"]]}
    assert main(["run", str(write_yaml(tmp_path / "run.yaml", run_cfg)), "-q"]) == 0
    c = config_from_dict(run_cfg)
    report = json.loads((c.run_dir / "report.json").read_text())
    held_out = pq.read_table(setup["test"]).num_rows
    m = report["models"]["student"]
    assert m["samples"]["prompts"] == held_out
    assert 0 < m["samples"]["tokens"] <= held_out * SAMPLE_NEW
    assert math.isfinite(m["teacher_nll_of_samples"]) and m["teacher_nll_of_samples"] > 0
    assert m["teacher_nll_of_samples"] == pytest.approx(sample_nll_in_process(c, "student"), abs=1e-3)
    assert not any("teacher_nll_of_samples" in report["models"][n] for n in ("small", "large", "ensemble"))
    assert "teacher_nll_of_samples" in (c.run_dir / "report.md").read_text()
