"""`distill generate` end to end on real Ray Serve, two tiny instruction teachers, n=2:

  killed (SIGKILL) mid-run and re-run -> the same responses as an uninterrupted run with the
                                         same seed, each (prompt, teacher, sample) written once
  the parts                           -> shapes, end-token flags, own NLL = the teacher's score
  curation                            -> counts that add up; a re-run re-curates, no teacher work
  `distill run` on the curated data   -> tests/test_seqkd.py
  generate.top_p through Serve        -> every written token lies in its teacher's top-p nucleus
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator.cli import main
from tests.conftest import local_ray
from tests.helpers import write_yaml
from tests.helpers_gen import written_samples
from tests.helpers_lm import lm_config
from tests.test_faults import _descendants, _wait_for, _wait_gone

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
N, MAX_NEW = 2, 32
T, TOP_P = 0.8, 0.7


@pytest.fixture(scope="module")
def setup(gen_setup):
    return gen_setup  # tests/conftest.py: the instruction teachers, trained once per session


def _config(tmp: Path, setup: dict, **generate) -> dict:
    cfg = lm_config(tmp, setup, run={"name": "gen"},
                    dataset={"source": str(setup["train"]), "test_source": str(setup["test"]), "format": "prompt_response"},
                    lm={"max_len": 64, "k": 4}, ray={"num_cpus": 2},
                    generate={"n": N, "max_new_tokens": MAX_NEW, "temperature": T, "top_p": TOP_P, "seed": 3, "block_size": 5,
                              **generate})
    cfg["train"].update(epochs=1, workers=1, cpus_per_worker=1)
    cfg["eval"] = {"baseline": False, "sample_max_new_tokens": 0}  # teacher_nll_of_samples: tests/test_seqkd.py
    return cfg



def _check_top_p(setup: dict, samples: dict) -> None:
    """generate.top_p reached each replica's decode loop: every written token is in the nucleus of
    its own teacher's distribution at T (recomputed here, in-process), and without the cut the same
    positions would have written outside it often enough for this check to fail."""
    import torch
    from transformers import AutoModelForCausalLM

    models = {n: AutoModelForCausalLM.from_pretrained(p).eval() for n, p in setup["teachers"].items()}
    before, outside = [], 0.0  # mass strictly above each written token; expected misses without top_p
    for r in samples.values():
        prompt, toks = list(r["prompt_ids"]), list(r["response_ids"])
        with torch.no_grad():
            logits = models[r["teacher"]](torch.tensor([prompt + toks])).logits[0, len(prompt) - 1:-1].float()
        probs = torch.softmax(logits / T, dim=-1)
        own = probs.gather(-1, torch.tensor(toks)[:, None])
        before.append(((probs > own) * probs).sum(-1))
        sorted_p = probs.sort(-1, descending=True).values
        outside += float((sorted_p * (sorted_p.cumsum(-1) - sorted_p > TOP_P)).sum())
    before = torch.cat(before)
    assert float(before.max()) < TOP_P + 1e-4, "a token outside the top-p nucleus: generate.top_p did not apply"
    assert outside > 5, outside  # sampling at T alone would have left the nucleus ~`outside` times


def test_generate_killed_and_rerun_equals_an_uninterrupted_run(setup, tmp_path, capsys):
    cfg = _config(tmp_path, setup)
    path = write_yaml(tmp_path / "c.yaml", cfg)
    out = Path(cfg["output_dir"]) / "gen" / "generated"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DISTILL_TEST_HOOKS": json.dumps({"generate_stall_after_parts": 3})}
    p = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "generate", str(path)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    half = out / "parts" / "half-written.parquet.tmp"
    _wait_for(lambda: half.exists() or p.poll() is not None, timeout=300, what="the run to stall after 3 parts")
    assert p.poll() is None, p.stdout.read()
    ray_processes = _descendants(p.pid)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    _wait_gone(ray_processes)
    assert len(list((out / "parts").rglob("*.parquet"))) == 3
    first = {p: p.stat().st_mtime_ns for p in (out / "parts").rglob("*.parquet")}

    capsys.readouterr()
    with local_ray():  # one Ray (and Serve) for both runs; each `main` would start and stop its own
        assert main(["generate", str(path), "-q"]) == 0  # resumes
        said = capsys.readouterr().out
        assert f"next: distill run {path} dataset.source={out / 'generated.parquet'}" in said, said
        assert not list(out.rglob("*.tmp"))
        assert all(p.stat().st_mtime_ns == t for p, t in first.items()), "a finished part was written again"
        resumed = written_samples(out)
        ref_out = tmp_path / "ref"
        assert main(["generate", str(path), "-q", f"generate.output={ref_out}"]) == 0  # uninterrupted, same seed
    assert resumed == written_samples(ref_out)
    assert (out / "generated.parquet").read_bytes() == (ref_out / "generated.parquet").read_bytes()

    # The parts: 36 prompts x 2 teachers x n, each sample as its own teacher wrote and scored it.
    prompts = pq.read_table(setup["train"]).num_rows
    assert len(resumed) == prompts * 2 * N
    eos = 2  # </s> of the test tokenizer
    for r in resumed.values():
        assert r["sample_id"] == f"{r['prompt_id']}/{r['teacher']}/{r['sample_index']}"
        toks = r["response_ids"]
        assert r["finished"] == (toks[-1] == eos) and eos not in toks[:-1]
        assert r["finished"] or len(toks) == MAX_NEW
        assert np.array(r["topk_ids"]).shape == np.array(r["topk_logprobs"]).shape == (len(toks), 4)
        np.testing.assert_allclose(r["own_nll"], r[f"nll.{r['teacher']}"], atol=1e-3)  # own = served score
    finished = sum(r["finished"] for r in resumed.values())
    _check_top_p(setup, resumed)
    assert 0 < finished < len(resumed), "the test teachers should end some responses and not others"

    # Curation: counts add up, and what is kept is what generated.parquet holds.
    summary = json.loads((out / "generate.json").read_text())["curation"]
    assert summary["total"] == len(resumed)
    assert summary["kept"] + sum(summary["dropped"].values()) == summary["total"]
    assert summary["dropped"]["no_eos"] == len(resumed) - finished
    kept = pq.read_table(out / "generated.parquet")
    assert kept.num_rows == summary["kept"] > 0
    assert set(kept.column("sample_id").to_pylist()) <= {k for k, r in resumed.items() if r["finished"]}
    assert {"prompt", "response", "ensemble_nll", "own_nll"} <= set(kept.column_names)

    # Re-curating (another keep) needs no teacher and leaves the parts alone.
    assert main(["generate", str(path), "-q", "generate.keep=1", "ray.address=ray://nowhere:1"]) == 0
    again = json.loads((out / "generate.json").read_text())["curation"]
    per_prompt = pq.read_table(out / "generated.parquet").column("prompt_id").to_pylist()
    assert len(per_prompt) == len(set(per_prompt)) == again["kept"] <= summary["kept"]
    assert written_samples(out) == resumed

    # A different seed writes elsewhere, or is refused here.
    assert main(["generate", str(path), "-q", "generate.seed=4"]) == 2

    # (`distill run` on the curated responses, a store labeled by the teachers and a student trained
    # and scored on them: tests/test_seqkd.py, which runs it on this same kind of generated data)
