"""Held-out LM evaluation maths (no Ray): the ensemble's perplexity, exact where it can be."""
from __future__ import annotations

import numpy as np
import pytest

from orchestrator.evaluate import ensemble_true_token_nll, evaluate_lm, flat_scores, lm_rows
from orchestrator.models import CausalLMTeacher
from tests.helpers_lm import make_tokenizer, corpus, make_lm


@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("evallm")
    tok = make_tokenizer(root / "tok", corpus(6), vocab=280)
    teachers = [{"name": n, "backend": "hf", "path": str(make_lm(root / n, tok, corpus(6), 32, 1, seed=s, steps=5))}
                for n, s in (("a", 1), ("b", 2))]
    windows = np.array(tok(" ".join(corpus(6)))["input_ids"][: 4 * 16]).reshape(4, 16)
    from orchestrator.datasets import token_table

    return teachers, token_table(windows), len(tok)


def scored(teachers, test, k, batch=3):
    """Each teacher's scores as evaluation gets them from Serve: score() per batch of rows."""
    rows, labels = lm_rows(test)
    out = {}
    for t in teachers:
        teacher = CausalLMTeacher(t, k)
        ids, lps, nll = flat_scores([teacher.score(rows[i:i + batch]) for i in range(0, len(rows), batch)], k)
        out[t["name"]] = {"ids": ids, "logprobs": lps, "nll": nll, "params": 1, "latency_ms": 0.0, "backend": "hf"}
    return labels, out


def test_mean_prob_ensemble_perplexity_is_the_exact_mixture(tiny_lms):
    teachers, test, vocab = tiny_lms
    ens = {"mode": "mean_prob", "tau": 1.0, "weights": {"a": 1.0, "b": 3.0}}
    labels, scores = scored(teachers, test, 4)  # 4 windows: batches of 3 and 1
    out = evaluate_lm(labels, scores, ens, {}, k=4, vocab_size=vocab)["models"]
    windows = np.stack(test.column("input_ids").to_numpy(zero_copy_only=False)).astype(np.int64)
    p = [np.exp(-CausalLMTeacher(t, 4).nll(windows).astype(np.float64)) for t in teachers]
    expect = float(np.exp(-np.log(0.25 * p[0] + 0.75 * p[1]).mean()))
    assert out["ensemble"]["perplexity"] == pytest.approx(expect, rel=1e-6)
    assert "approximation" not in out["ensemble"]


def test_k_equal_to_the_vocabulary_scores_without_dividing_by_zero(tiny_lms):
    # lm.k == vocab_size is allowed; the approximate path divided the tail by V - k = 0.
    teachers, test, vocab = tiny_lms
    ens = {"mode": "mean_logit", "tau": 1.0, "weights": {"a": 1.0, "b": 1.0}}
    with np.errstate(divide="raise", invalid="raise"):
        out = evaluate_lm(*scored(teachers, test, vocab), ens, {}, k=vocab, vocab_size=vocab)["models"]
    assert np.isfinite(out["ensemble"]["perplexity"]) and out["ensemble"]["perplexity"] > 1.0


def test_a_true_token_outside_the_union_gets_its_share_of_the_tail():
    # V = 10, k = 2: the true token 7 is not kept, so it gets tail / (V - k) = 0.4 / 8.
    e_ids, e_lps = np.array([[1, 2]]), np.log(np.array([[0.4, 0.2]]))
    nll, how = ensemble_true_token_nll(np.zeros((1, 1)), np.ones(1), "entropy", e_ids, e_lps, np.array([0.4]),
                                       np.array([7]), 10)
    assert nll[0] == pytest.approx(-np.log(0.05)) and "uniform tail" in how


@pytest.mark.parametrize("mode", ["mean_prob", "mean_logit"])
def test_the_ensemble_in_chunks_of_positions_equals_it_in_one(tiny_lms, monkeypatch, mode):
    import orchestrator.evaluate

    teachers, test, vocab = tiny_lms
    ens = {"mode": mode, "tau": 1.0, "weights": {"a": 1.0, "b": 2.0}}
    labels, scores = scored(teachers, test, 4)
    whole = evaluate_lm(labels, scores, ens, {}, k=4, vocab_size=vocab)["models"]["ensemble"]
    monkeypatch.setattr(orchestrator.evaluate, "ENSEMBLE_CHUNK", 7)  # 60 positions: 9 chunks, the last short
    chunked = evaluate_lm(labels, scores, ens, {}, k=4, vocab_size=vocab)["models"]["ensemble"]
    assert chunked == whole


@pytest.mark.parametrize("packed", [False, True])
def test_teacher_scores_in_chunks_of_positions_equal_the_full_softmax(tiny_lms, monkeypatch, packed):
    # packing.topk_at puts CHUNK_ELEMENTS // V positions at a time through the head: here 7 of
    # the 60 window positions (9 chunks, the last short), or of the 28 loss positions when packed.
    import torch

    import orchestrator.packing

    teachers, test, vocab = tiny_lms
    windows = np.stack(test.column("input_ids").to_numpy(zero_copy_only=False)).astype(np.int64)  # [4, 16]
    rows = windows
    if packed:  # one example per row, loss on its last 8 tokens
        mask = np.zeros_like(windows)
        mask[:, 8:] = 1
        rows = np.stack([windows, np.broadcast_to(np.arange(16), windows.shape), mask], axis=1)
    teacher = CausalLMTeacher(teachers[0], 4)
    whole = teacher.score(rows)
    monkeypatch.setattr(orchestrator.packing, "CHUNK_ELEMENTS", 7 * vocab)
    chunked = teacher.score(rows)
    with torch.inference_mode():  # by hand: log-softmax of the model's own logits, every position at once
        logp = torch.log_softmax(teacher.model(input_ids=torch.from_numpy(windows)).logits[:, :-1].double(), -1)
    chosen = slice(None) if not packed else slice(7, None)  # the positions whose next token carries loss
    expect = logp[:, chosen]
    top = expect.topk(4, dim=-1)
    nll = -expect.gather(-1, torch.from_numpy(windows[:, 1:][:, chosen])[..., None])[..., 0]
    for got in (whole, chunked):
        np.testing.assert_array_equal(got[0].reshape(-1, 4), top.indices.reshape(-1, 4).numpy())
        np.testing.assert_allclose(got[1].reshape(-1, 4), top.values.reshape(-1, 4).numpy(), atol=1e-5)
        np.testing.assert_allclose(got[2].reshape(-1), nll.reshape(-1).numpy(), atol=1e-5)
    assert chunked[2].shape == ((4, 15) if not packed else (4 * 8,))
