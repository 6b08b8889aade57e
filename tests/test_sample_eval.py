"""teacher_nll_of_samples, the pure parts (no Ray): prompts found in packed held-out rows, new-token
budgets, the ensemble's NLL per written token on hand-computed cases, and a student's greedy
answers cut at their budgets (the decode the Ray task runs, called in-process)."""
from __future__ import annotations

import math

import numpy as np
import torch

from orchestrator.instruct import pack_examples
from orchestrator.report import table
from orchestrator.sample_eval import _sample_task, budgets, ensemble_nll_per_token, held_out_prompts, labels_of


def _rows(examples, max_len, packing=True):
    ids, pos, mask, _ = pack_examples([(np.array(i), np.array(m, np.uint8)) for i, m in examples], max_len, 0, packing)
    return np.stack([ids, pos, mask], axis=1)


def test_held_out_prompts_are_the_tokens_before_each_examples_first_loss_token():
    examples = [([5, 6, 7, 8, 9], [0, 0, 1, 1, 1]),  # prompt 5 6
                ([10, 11, 12], [0, 1, 1]),  # prompt 10
                ([20, 21, 22, 23, 24, 25], [0, 0, 0, 1, 0, 1])]  # prompt 20 21 22 (two answer turns)
    packed = _rows(examples, 10)  # the first two share a window, the third and padding another
    assert packed.shape[0] == 2
    assert held_out_prompts(packed) == [[5, 6], [10], [20, 21, 22]]
    assert held_out_prompts(_rows(examples, 10, packing=False)) == [[5, 6], [10], [20, 21, 22]]


def test_budgets_cut_the_answer_to_what_fits_max_len():
    assert budgets([[1] * 5, [1] * 9, [1] * 10], max_new_tokens=4, max_len=10) == [4, 1, 0]


def test_mean_prob_nll_per_written_token_is_the_weighted_mixture():
    # token 0: teachers give it p 0.5 and 0.25; token 1: 0.1 and 0.3. Weights 3 : 1.
    nll = -np.log(np.array([[0.5, 0.1], [0.25, 0.3]]))
    teachers = [{"ids": np.zeros((2, 1), np.int64), "logprobs": np.zeros((2, 1)), "nll": n} for n in nll]
    got, how = ensemble_nll_per_token(teachers, [3, 1], "mean_prob", 1.0, np.array([4, 7]), k=1, vocab_size=10)
    assert how is None  # exact
    np.testing.assert_allclose(got, [-math.log(0.75 * 0.5 + 0.25 * 0.25), -math.log(0.75 * 0.1 + 0.25 * 0.3)])
    # label-weighted modes cannot weight by a true label here: scored as mean_prob, as evaluation does
    again, _ = ensemble_nll_per_token(teachers, [3, 1], "best_teacher", 1.0, np.array([4, 7]), k=1, vocab_size=10)
    np.testing.assert_allclose(again, got)


def test_mean_logit_nll_uses_the_top_k_and_an_equal_share_of_the_tail():
    # Two identical teachers over V=4: top-2 {0: 0.5, 1: 0.3}, tail 0.2. Their product of experts
    # is the same distribution; a written token outside the top-2 gets 0.2 / (4 - 2).
    ids = np.array([[0, 1], [0, 1]])
    lps = np.log(np.array([[0.5, 0.3], [0.5, 0.3]]))
    t = {"ids": ids, "logprobs": lps, "nll": np.zeros(2)}
    got, how = ensemble_nll_per_token([t, dict(t)], [1, 1], "mean_logit", 1.0, np.array([0, 3]), k=2, vocab_size=4)
    assert how and "tail" in how
    np.testing.assert_allclose(got, [-math.log(0.5), -math.log(0.1)], rtol=1e-3)


def test_labels_follow_the_scored_order_and_skip_empty_answers():
    samples = [{"tokens": np.array([3, 4], np.int32)}, {"tokens": np.array([], np.int32)}, {"tokens": np.array([9])}]
    assert labels_of(samples).tolist() == [3, 4, 9]


def test_student_answers_greedily_and_stops_at_its_budget_or_end_token(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)).eval()
    prompts, limits = [[1, 5, 6], [1, 7]], [6, 2]
    got = _sample_task(model, prompts, limits, [11], 0, 0.0, 0)

    def greedy(p, n):  # the plain loop: argmax of a full forward pass, one token at a time
        out = list(p)
        for _ in range(n):
            with torch.no_grad():
                nxt = int(model(torch.tensor([out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == 11:
                break
        return out[len(p):]

    for s, p, n in zip(got, prompts, limits):
        assert s["tokens"].tolist() == greedy(p, n)
        assert len(s["tokens"]) <= n
        assert s["finished"] == (s["tokens"][-1] == 11)


def test_report_table_shows_teacher_nll_of_samples_only_when_measured():
    base = {"large": {"kind": "teacher", "perplexity": 3.0}, "student": {"kind": "student", "perplexity": 4.0}}
    assert "teacher_nll_of_samples" not in table(base, "lm")
    with_samples = {**base, "student": {**base["student"], "teacher_nll_of_samples": 1.25}}
    lines = table(with_samples, "lm").splitlines()
    assert "teacher_nll_of_samples" in lines[0]
    assert "| student | student | 4.0000 | 1.2500 |" in lines[-1]
