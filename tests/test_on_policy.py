"""On-policy distillation, the pure parts (orchestrator/on_policy.py) and the divergences it trains
with (orchestrator/losses.py's top-k losses over the sampled positions), against hand values.
The run on real Ray is tests/test_on_policy_run.py."""
import math

import numpy as np
import pytest
import torch

from orchestrator.config import config_from_dict
from orchestrator.errors import DistillError
from orchestrator.instruct import pack_examples
from orchestrator.losses import build_topk_loss
from orchestrator.on_policy import (completion_rows, ensemble_scores, is_on_policy, prompts_of, sample_seed,
                                    sampled_tokens)

LN2 = math.log(2)


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


# ---- which batches are on-policy ----------------------------------------------------------


def test_choice_is_a_function_of_seed_epoch_and_batch():
    picks = [is_on_policy(0, 0, b, 0.5, 1) for b in range(400)]
    assert picks == [is_on_policy(0, 0, b, 0.5, 1) for b in range(400)]  # a resumed run chooses alike
    assert 150 < sum(picks) < 250  # about half (400 draws: 5 sigma is +-50)
    assert picks != [is_on_policy(1, 0, b, 0.5, 1) for b in range(400)]  # the seed matters
    assert picks != [is_on_policy(0, 1, b, 0.5, 1) for b in range(400)]  # and the epoch
    assert not any(is_on_policy(0, 0, b, 0.0, 1) for b in range(100))
    assert all(is_on_policy(0, 0, b, 1.0, 1) for b in range(100))


def test_every_considers_only_every_nth_batch():
    picks = [b for b in range(60) if is_on_policy(3, 2, b, 1.0, 3)]
    assert picks == list(range(0, 60, 3))


def test_sample_seeds_differ_per_rank_and_prompt_and_fit_a_generator():
    seeds = {sample_seed(0, 1, 2, r, i) for r in range(2) for i in range(5)}
    assert len(seeds) == 10 and all(0 <= s < 2**63 for s in seeds)
    torch.Generator().manual_seed(max(seeds))
    assert sample_seed(0, 1, 2, 0, 0) == sample_seed(0, 1, 2, 0, 0)


# ---- prompts out of packed rows, completions back in ----------------------------------------


def _packed(examples, max_len=12, pad=0):
    ids, pos, mask, _ = pack_examples([(np.array(i), np.array(m, np.uint8)) for i, m in examples], max_len, pad)
    return ids, pos, mask


def test_prompts_are_the_tokens_before_each_examples_first_loss_token():
    # two examples in the first window (3+2 and 2+3 tokens), one in the second; padding after them
    ids, pos, mask = _packed([([5, 6, 7, 8, 9], [0, 0, 0, 1, 1]), ([10, 11, 12, 13, 14], [0, 0, 1, 1, 1]),
                              ([20, 21, 22, 23, 24, 25, 26, 27], [0, 0, 0, 0, 1, 1, 1, 1])], max_len=12)
    assert ids.shape == (2, 12)
    assert prompts_of(ids, pos, mask) == [[5, 6, 7], [10, 11], [20, 21, 22, 23]]


def test_chat_prompt_keeps_later_turns_out():
    # a two-turn chat: the prompt stops at the first assistant token
    ids, pos, mask = _packed([([1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 1, 1, 0, 0, 1, 1])])
    assert prompts_of(ids, pos, mask) == [[1, 2]]


def test_completion_rows_carry_loss_on_the_samples_only_and_cut_at_max_len():
    rows = completion_rows([[5, 6, 7], [10, 11]], [np.array([8, 2]), np.array([12, 13, 14, 2])], max_len=8, pad_id=0)
    assert rows.shape == (2, 3, 8)  # 5 + 6 tokens do not share a window of 8
    np.testing.assert_array_equal(rows[0, 0], [5, 6, 7, 8, 2, 0, 0, 0])
    np.testing.assert_array_equal(rows[0, 2], [0, 0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(rows[1, 1, :6], np.arange(6))
    np.testing.assert_array_equal(sampled_tokens(rows), [8, 2, 12, 13, 14, 2])
    cut = completion_rows([[5, 6, 7]], [np.array([1, 2, 3, 4, 5, 6, 7])], max_len=5, pad_id=0)
    np.testing.assert_array_equal(sampled_tokens(cut), [1, 2])  # the prompt stays whole, the sample is cut


def test_prompts_of_completion_rows_round_trip():
    prompts = [[5, 6, 7], [10, 11], [3]]
    rows = completion_rows(prompts, [np.array([8]), np.array([9, 9]), np.array([4, 4, 4])], max_len=16, pad_id=0)
    assert prompts_of(rows[:, 0], rows[:, 1], rows[:, 2]) == prompts


# ---- the ensemble of the teachers' scores ----------------------------------------------------


def test_ensemble_scores_mean_prob_and_mixture_nll_by_hand():
    # V = 4, k = 2, one sampled position (token 1); teacher a: {0: 0.5, 1: 0.25}, b: {1: 0.5, 2: 0.25}
    a = (np.array([[0, 1]]), np.log([[0.5, 0.25]]), np.array([-math.log(0.25)]))
    b = (np.array([[1, 2]]), np.log([[0.5, 0.25]]), np.array([-math.log(0.5)]))
    ens = {"mode": "mean_prob", "temperature": 1.0, "tau": 1.0, "weights": {"a": 1.0, "b": 3.0}}
    ids, lps, tail, nll = ensemble_scores({"b": b, "a": a}, ens, k=2, vocab_size=4, tokens=np.array([1]))
    # mixture: 0: 0.25 * 0.5 = 0.125, 1: 0.25 * 0.25 + 0.75 * 0.5 = 0.4375, 2: 0.75 * 0.25 = 0.1875
    np.testing.assert_array_equal(ids, [[1, 2]])
    np.testing.assert_allclose(np.exp(lps), [[0.4375, 0.1875]], rtol=1e-6)
    np.testing.assert_allclose(tail, [1 - 0.4375 - 0.1875], rtol=1e-6)
    assert nll == pytest.approx(-math.log(0.4375))  # the sampled token's mixture probability, at T=1


# ---- the divergences over the sampled positions (top-k + tail bucket) -----------------------

# Student logits [ln 2, 0, 0] over V = 3: p_s = [1/2, 1/4, 1/4]; the target lists token 0 with 0.8,
# so the buckets are p_t = [0.8 | 0.2] and p_s = [0.5 | 0.5].
STUDENT = torch.tensor([[LN2, 0.0, 0.0]], dtype=torch.float64)
IDS, LPS = torch.tensor([[0]]), torch.tensor([[math.log(0.8)]], dtype=torch.float64)
PT, PS = (0.8, 0.2), (0.5, 0.5)


@pytest.mark.parametrize("divergence, beta, expected", [
    ("reverse_kl", 0.5, kl(PS, PT)),
    ("forward_kl", 0.5, kl(PT, PS)),
    # generalised JSD: m = beta p_t + (1 - beta) p_s = [0.56, 0.44] at beta 0.2
    ("jsd", 0.2, 0.2 * kl(PT, (0.56, 0.44)) + 0.8 * kl(PS, (0.56, 0.44))),
    ("jsd", 0.0, 0.0),  # m = p_s: KL(p_s || p_s)
    ("jsd", 1.0, 0.0),  # m = p_t
])
def test_divergences_by_hand(divergence, beta, expected):
    loss = build_topk_loss(divergence, beta=beta, temperature=1.0)(STUDENT, IDS, LPS)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_reverse_kl_pulls_the_student_towards_the_target_bucket():
    logits = STUDENT.clone().requires_grad_(True)
    build_topk_loss("reverse_kl", temperature=1.0)(logits, IDS, LPS).backward()
    assert logits.grad[0, 0] < 0  # raise token 0 (0.5 -> 0.8)
    assert logits.grad[0, 1] > 0 and logits.grad[0, 2] > 0


# ---- config ----------------------------------------------------------------------------


def _instruct_cfg(**train):
    return {"task": "lm", "dataset": {"source": "x.parquet", "format": "chat"},
            "teachers": [{"name": "t", "backend": "hf", "path": "t"}],
            "student": {"init": "teacher", "teacher": "t", "layers": [0]}, "train": train}


def test_config_defaults_and_limits():
    cfg = config_from_dict(_instruct_cfg(on_policy={"fraction": 0.25}))
    assert cfg.train.on_policy.model_dump() == {"fraction": 0.25, "max_new_tokens": 32, "temperature": 1.0, "every": 1,
                                                "divergence": "reverse_kl", "beta": 0.5, "sampler": "hf", "engine": None}
    assert config_from_dict(_instruct_cfg()).train.on_policy is None
    # fsdp: each worker gathers the whole student to sample (actors/fsdp_sampling.py), no longer refused
    assert config_from_dict(_instruct_cfg(on_policy={}, strategy="fsdp")).train.strategy == "fsdp"


@pytest.mark.parametrize("train, expect", [
    ({"on_policy": {"fraction": 1.5}}, r"train\.on_policy\.fraction: Input should be less than or equal to 1"),
    ({"on_policy": {"fraction": -0.1}}, r"train\.on_policy\.fraction: Input should be greater than or equal to 0"),
    ({"on_policy": {"divergence": "tv"}}, r"train\.on_policy\.divergence: Input should be 'reverse_kl', 'jsd' or 'forward_kl'"),
    ({"on_policy": {"every": 0}}, r"train\.on_policy\.every: Input should be greater than or equal to 1"),
    ({"on_policy": {"beta": 2}}, r"train\.on_policy\.beta: Input should be less than or equal to 1"),
])
def test_config_errors(train, expect):
    with pytest.raises(DistillError, match=expect):
        config_from_dict(_instruct_cfg(**train))


def test_on_policy_needs_instruction_data():
    cfg = _instruct_cfg(on_policy={})
    cfg["dataset"]["format"] = "text"
    with pytest.raises(DistillError, match=r"train\.on_policy: needs task lm with instruction data .*got dataset\.format text"):
        config_from_dict(cfg)


@pytest.mark.parametrize("on_policy, baseline, fmt, new_tokens, keep, says", [
    ({}, False, "chat", 32, True, "teachers stay up from labeling through evaluation: train.on_policy needs them"),
    ({}, True, "chat", 32, True, "shut down before the hard-label baseline trains"),
    (None, False, "chat", 32, False, "deployed again at evaluation for teacher_nll_of_samples"),
    (None, False, "chat", 0, False, None),  # no sample eval: no stage after labeling needs them
    (None, True, "text", 32, False, None),  # text windows have no prompts to answer
])
def test_pipeline_keeps_teachers_up_across_stages_only_for_on_policy_training(on_policy, baseline, fmt, new_tokens,
                                                                             keep, says):
    from orchestrator.teacher_pool import plan

    raw = _instruct_cfg(**({"on_policy": on_policy} if on_policy is not None else {}))
    raw["dataset"]["format"] = fmt
    raw["eval"] = {"baseline": baseline, "sample_max_new_tokens": new_tokens}
    got_keep, why = plan(config_from_dict(raw))
    assert got_keep is keep
    assert why is None if says is None else says in why


def test_sampled_logits_skip_the_prompts_and_equal_the_full_forward():
    # The student's head runs from the first position that predicts a sampled token on only;
    # the selected logits and their gradients are those of the full forward.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.on_policy import sampled_logits
    from orchestrator.instruct import targets

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    rows = completion_rows([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17]], [np.array([20, 21]), np.array([22])],
                           12, 0)
    x, pos = (torch.from_numpy(rows[:, i]).long() for i in (0, 1))
    sel = torch.from_numpy(targets(rows))
    assert sel.any(0).nonzero()[0].item() == 5  # the first sampled token is predicted from position 5
    got = sampled_logits(model, model, x, pos, sel)
    (g_got,) = torch.autograd.grad(got.square().sum(), model.lm_head.weight)
    full = model(input_ids=x, position_ids=pos, use_cache=False).logits[:, :-1][sel]
    (g_full,) = torch.autograd.grad(full.square().sum(), model.lm_head.weight)
    assert got.shape == (3, 40)
    torch.testing.assert_close(got, full)
    torch.testing.assert_close(g_got, g_full)
