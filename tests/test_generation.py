"""`distill generate`'s pure parts, no Ray: the decode loop, curation, the config and the
checks that refuse bad prompts or teachers before anything runs."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.config import config_from_dict
from orchestrator.curation import curate, mixture_nll
from orchestrator.errors import DistillError
from orchestrator.generate import sample_seed
from orchestrator.prompts import eos_ids, load_prompts
from orchestrator.generation import _filtered, sample


@pytest.fixture(scope="module")
def tiny():
    """A random 1-layer Llama (no training: the loop's contract does not need a good model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


PROMPTS = [[3, 5, 7, 9, 11], [4], [8, 8, 2]]


def _run(model, prompts=PROMPTS, seeds=((1, 2), (3, 4), (5, 6)), **kv):
    opts = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 10, "eos_ids": [0], "k": 4, "pad_id": 1, **kv}
    return sample(model, prompts, [list(s) for s in seeds], **opts)


def test_greedy_equals_transformers_generate(tiny):
    out = _run(tiny, temperature=0, eos_ids=[39])
    for p, samples in zip(PROMPTS, out):
        ref = tiny.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=39, pad_token_id=1)
        assert samples[0]["tokens"].tolist() == ref[0, len(p):].tolist()
        assert samples[0]["tokens"].tolist() == samples[1]["tokens"].tolist()  # greedy: seeds unused



def test_vocab_limit_writes_no_padding_row(tiny):
    """A head wider than the tokenizer (padding rows, here ids 30-39 made the likeliest by a copy
    of the model whose head favours them) writes no id past vocab_limit, greedy or sampled, while
    its NLL / top-k stay the model's own (the padding rows are still listed)."""
    import copy

    wide = copy.deepcopy(tiny)
    with torch.no_grad():
        wide.lm_head.weight[30:] = wide.lm_head.weight[30:] * 0 + wide.lm_head.weight[:30].sum(0) * 3
    free = [s for ss in _run(wide, eos_ids=[-1]) for s in ss]
    assert max(int(s["tokens"].max()) for s in free) >= 30  # without the limit it writes them
    for temperature in (0.0, 1.0):
        limited = [s for ss in _run(wide, temperature=temperature, eos_ids=[-1], vocab_limit=30) for s in ss]
        assert all(int(s["tokens"].max()) < 30 for s in limited)
        assert any(int(s["topk_ids"].max()) >= 30 for s in limited)

def test_own_nll_and_topk_are_the_teachers_at_t1(tiny):
    """The NLL and top-k kept per generated token are those of one plain forward pass over
    prompt + response (left padding and the KV cache change nothing), at T=1 whatever the
    sampling temperature."""
    for p, samples in zip(PROMPTS, _run(tiny, temperature=1.7)):
        s = samples[0]
        full = torch.tensor([p + s["tokens"].tolist()])
        with torch.no_grad():
            logp = torch.log_softmax(tiny(full).logits[0, len(p) - 1:-1].float(), -1)
        nll = -logp.gather(-1, full[0, len(p):, None])[:, 0]
        np.testing.assert_allclose(s["nll"], nll.numpy(), atol=1e-4)
        np.testing.assert_allclose(s["topk_logprobs"], logp.topk(4).values.numpy(), atol=1e-4)
        assert s["topk_ids"].shape == (len(s["tokens"]), 4) and s["topk_ids"].dtype == np.int32


def test_a_sample_depends_on_its_seed_only(tiny):
    """Same seed, same tokens, whichever prompts share the batch; another seed, other tokens."""
    alone = _run(tiny, prompts=PROMPTS[:1], seeds=((1, 2),))[0]
    batched = _run(tiny)[0]
    assert [s["tokens"].tolist() for s in alone] == [s["tokens"].tolist() for s in batched]
    assert alone[0]["tokens"].tolist() != alone[1]["tokens"].tolist()


def test_end_token_ends_a_sample_and_is_kept(tiny):
    """Every token is an end token: each sample is that one token, finished. No end token
    reachable: max_new_tokens tokens, unfinished."""
    for s in (x for ss in _run(tiny, eos_ids=list(range(40))) for x in ss):
        assert len(s["tokens"]) == 1 and s["finished"]
    for s in (x for ss in _run(tiny, eos_ids=[-5]) for x in ss):
        assert len(s["tokens"]) == 10 and not s["finished"]


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    np.testing.assert_allclose(_filtered(logits, 1.0, 0.7).numpy(), [[0.5, 0.3, 0, 0]], atol=1e-6)  # 0.5 < 0.7 <= 0.8
    np.testing.assert_allclose(_filtered(logits, 1.0, 0.1).numpy(), [[0.5, 0, 0, 0]], atol=1e-6)  # the top one always



def test_top_p_search_in_the_top_k_cuts_where_a_full_sort_does(monkeypatch):
    """_filtered looks for the nucleus in the top _NUCLEUS_K first and sorts whole only the rows whose
    top _NUCLEUS_K hold no more than top_p: both kinds of row in one batch give the full sort's cut."""
    import orchestrator.generation as g

    monkeypatch.setattr(g, "_NUCLEUS_K", 8)
    gen = torch.Generator().manual_seed(0)
    peaked, flat = torch.randn(3, 200, generator=gen) * 6, torch.randn(2, 200, generator=gen) * 0.1
    logits = torch.cat([peaked, flat])
    for temperature, top_p in ((1.0, 0.5), (0.7, 0.9), (1.3, 0.3)):
        probs = torch.softmax(logits / temperature, -1)
        sorted_p, order = probs.sort(-1, descending=True)
        top8 = sorted_p[:, :8].sum(-1)
        assert bool((top8[:3] > top_p).all()) and bool((top8[3:] <= top_p).all())  # both paths taken
        full = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p, 0.0))
        assert torch.equal(g._filtered(logits, temperature, top_p), full)

def test_mixture_nll_hand_computed():
    # Two teachers give the written token p = 1/2 and 1/4: the mixture 3/8 (equal weights), 5/16 (1:3).
    assert mixture_nll(np.log([[2.0], [4.0]]), [1, 1]) == pytest.approx(-math.log(3 / 8))
    assert mixture_nll(np.log([[2.0, 2.0], [4.0, 4.0]]), [1, 3]) == pytest.approx(-math.log(5 / 16))


def _s(pid, tokens, finished=True, score=1.0, empty=False):
    return {"prompt_id": pid, "tokens": tokens, "finished": finished, "score": score, "empty": empty}


def test_curation_drops_in_order_and_counts():
    samples = [
        _s("a", [5, 0], score=2.0),  # 0 kept
        _s("a", [6, 7], finished=False, score=0.1),  # 1 no end token
        _s("a", [5, 0], score=2.0),  # 2 duplicate of 0 (another teacher, say)
        _s("b", [5, 0], score=0.5),  # 3 same tokens, other prompt: kept
        _s("a", [0], empty=True),  # 4 nothing but the end token
        _s("a", [8, 0], score=9.0),  # 5 above max_nll
        _s("a", [9, 0], score=1.0),  # 6 kept, and best of a
        _s("a", [4, 0], score=3.0),  # 7 third best of a: over keep
        _s("b", [2, 0], score=float("nan")),  # 8 NaN score: dropped as above max_nll
    ]
    kept, counts = curate(samples, max_nll=5.0, keep=2)
    assert kept == [0, 3, 6]
    assert counts == {"total": 9, "kept": 3,
                      "dropped": {"no_eos": 1, "empty": 1, "duplicate": 1, "max_nll": 2, "over_keep": 1}}
    kept, counts = curate(samples)  # no threshold, no cap: only the three structural drops
    assert kept == [0, 3, 5, 6, 7, 8] and counts["kept"] == 6


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, "p", "a", 0) == sample_seed(0, "p", "a", 0)
    assert len({sample_seed(s, p, t, i) for s in (0, 1) for p in "pq" for t in "ab" for i in (0, 1)}) == 16
    assert 0 <= sample_seed(7, "p", "a", 3) < 2**63


# Config and input checks.

def _cfg(tmp: Path, **generate) -> dict:
    return {"task": "lm", "output_dir": str(tmp / "runs"),
            "dataset": {"source": str(tmp / "p.parquet"), "format": "prompt_response"},
            "teachers": [{"name": "a", "backend": "hf", "path": str(tmp)}], "student": {"config": str(tmp / "s.json")},
            "lm": {"max_len": 16}, "generate": generate}


@pytest.mark.parametrize("generate, expect", [
    ({"n": 0}, "generate.n: Input should be greater than or equal to 1 (got 0)"),
    ({"top_p": 0}, "generate.top_p: Input should be greater than 0 (got 0)"),
    ({"max_new_tokens": 0}, "generate.max_new_tokens: Input should be greater than or equal to 1 (got 0)"),
    ({"keep": 0}, "generate.keep: Input should be greater than or equal to 1 (got 0)"),
    ({"temperature": -1}, "generate.temperature: Input should be greater than or equal to 0 (got -1)"),
    ({"sampels": 3}, "generate.sampels: unknown key (check the spelling)"),
])
def test_generate_config_errors(tmp_path, generate, expect):
    with pytest.raises(DistillError) as e:
        config_from_dict(_cfg(tmp_path, **generate))
    assert str(e.value) == f"config: {expect}" and "\n" not in str(e.value)


def test_generate_section_on_classification_is_refused(tmp_path):
    with pytest.raises(DistillError, match=r"generate\.n: not used by task classification"):
        config_from_dict({"dataset": {"source": "sklearn:digits"}, "teachers": [{"name": "a", "backend": "torch", "path": "x"}],
                          "generate": {"n": 2}})


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tests.helpers_lm import corpus, make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"), corpus(3), vocab=120)


def _prompts(tmp: Path, tok, rows: list[str], **generate):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": pa.array(rows, pa.string())}), tmp / "p.parquet")
    (tmp / "s.json").write_text("{}")
    return load_prompts(config_from_dict(_cfg(tmp, **generate)), tok)


def test_prompts_ids_and_room(tmp_path, tok):
    prompts = _prompts(tmp_path, tok, ["a b", "c", "a b"], max_new_tokens=4)
    assert [p.row for p in prompts] == [0, 1, 2] and prompts[0].ids == tok("a b")["input_ids"]
    assert prompts[2].id == prompts[0].id + "-1"  # a repeated prompt keeps its own id
    with pytest.raises(DistillError, match=r"dataset.prompt: prompt \w+ \(row 1\) is \d+ tokens, and with "
                                           r"generate.max_new_tokens 12 it does not fit lm.max_len 16"):
        _prompts(tmp_path, tok, ["a", "the quick brown fox jumps over"], max_new_tokens=12)


def test_an_empty_prompt_set_is_refused(tmp_path, tok):
    with pytest.raises(DistillError, match="has no prompts to generate for"):
        _prompts(tmp_path, tok, [])


def test_a_teacher_without_an_end_token_is_refused(tmp_path, tok):
    src = tmp_path / "t"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"eos_token_id": None}))
    no_eos = tok.__class__(tokenizer_object=tok.backend_tokenizer)  # the same vocabulary, no eos_token
    assert no_eos.eos_token_id is None
    with pytest.raises(DistillError, match=r"teacher 't': no end-of-sequence token .* set one$"):
        eos_ids("t", src, no_eos)
    assert eos_ids("t", src, tok) == [tok.eos_token_id]  # the tokenizer's, when the model files name none
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert eos_ids("t", src, no_eos) == [2, 7]
    # a newer version of the family ending with a token the (older, narrower) ensemble tokenizer lacks
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, len(tok) + 1]}))
    assert eos_ids("t", src, tok) == [2]
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": len(tok) + 1}))
    with pytest.raises(DistillError, match=rf"teacher 't': its end-of-sequence ids \[{len(tok) + 1}\] \(.*"
                                           rf"generation_config\.json\) lie past the ensemble's tokenizer "
                                           rf"\({len(tok)} ids\), which no sampler writes"):
        eos_ids("t", src, tok)
    shutil.rmtree(src)


def test_chat_prompts_and_curated_output_load_as_instruction_data(tmp_path, tok):
    """format chat: the prompt is the conversation without its trailing answer, rendered with the
    generation prompt; the curated file is chat data `distill run` reads (instruct.load_examples),
    the kept response as the assistant turn. The parts here are written by the real writer from
    hand-made samples (the teachers' side is tests/test_generate.py)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.generate import _curate, _part, _part_table, _write_part
    from orchestrator.instruct import load_examples

    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old answer"}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why"}]]
    pq.write_table(pa.table({"messages": convs}), tmp_path / "p.parquet")
    (tmp_path / "s.json").write_text("{}")
    cfg = config_from_dict({**_cfg(tmp_path, n=2, max_new_tokens=4, max_nll=3.0),
                            "dataset": {"source": str(tmp_path / "p.parquet"), "format": "chat"},
                            "lm": {"max_len": 64}, "output_dir": str(tmp_path / "runs")})
    prompts = load_prompts(cfg, tok)
    assert prompts[0].value == convs[0][:1] and prompts[1].value == convs[1]
    text = tok.apply_chat_template(convs[0][:1], tokenize=False, add_generation_prompt=True)
    assert prompts[0].ids == tok(text, add_special_tokens=False)["input_ids"]

    eos, word = tok.eos_token_id, tok("yes", add_special_tokens=False)["input_ids"]

    def s(tokens, finished, nll):
        t = np.array(tokens, np.int32)
        return {"tokens": t, "finished": finished, "nll": np.full(len(t), nll, np.float32),
                "topk_ids": np.zeros((len(t), 4), np.int32), "topk_logprobs": np.zeros((len(t), 4), np.float32)}

    samples = [s(word + [eos], True, 1.0), s(word + [5], False, 1.0),  # prompt 0: kept, no end token
               s(word + [eos], True, 9.0), s([eos], True, 1.0)]  # prompt 1: above max_nll, empty
    out = cfg.generate_path
    scores = {"a": [x["nll"] for x in samples]}
    _write_part(_part(out, "a", 0), _part_table(prompts, "a", 2, samples, scores))
    summary = _curate(cfg, out, {"id": 1}, prompts, ["a"], tok)
    assert summary["kept"] == 1 and summary["dropped"] == {"no_eos": 1, "empty": 1, "duplicate": 0, "max_nll": 1,
                                                           "over_keep": 0}
    rows = load_examples(summary["dataset"], "chat")
    assert rows == [convs[0][:1] + [{"role": "assistant", "content": "yes"}]]
    kept = pq.read_table(summary["dataset"]).to_pylist()[0]
    assert kept["sample_id"] == f"{prompts[0].id}/a/0" and kept["response_ids"] == word + [eos]
    assert kept["ensemble_nll"] == pytest.approx(1.0) and kept["own_nll"] == pytest.approx(1.0)
