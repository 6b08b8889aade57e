"""Sparse (top-k) ensembling pinned against hand-computed values.

A teacher's row is k token ids + their probabilities at T=1; the unlisted mass is its
tail bucket. Probabilities are simple fractions so every expected value is by hand.
"""
import math

import numpy as np
import pytest

from orchestrator.ensemble import (MODES, PAD_ID, PAD_LOGPROB, ensemble_dense, ensemble_topk, log_softmax,
                                   teacher_disagreement, teacher_disagreement_topk, topk_tail_mass)

LN2 = math.log(2)
V = 10


def lp(*rows):
    """log of nested probability lists, as float64."""
    return np.log(np.array(rows, dtype=np.float64))


def check(out, ids, probs, tail, atol=1e-6):
    """Compare (ids_out, logprobs_out, tail_out) with expected ids / probabilities / tail."""
    ids_out, lp_out, tail_out = out
    assert ids_out.dtype == np.int64 and lp_out.dtype == np.float32 and tail_out.dtype == np.float32
    np.testing.assert_array_equal(ids_out, ids)
    np.testing.assert_allclose(np.exp(lp_out.astype(np.float64)), probs, rtol=0, atol=atol)
    np.testing.assert_allclose(tail_out, tail, rtol=0, atol=atol)


# Two teachers, k=2, two positions.
#   position 0, disjoint supports: teacher 0 lists {2: 1/4, 1: 1/2} (tail 1/4, unsorted row),
#                                  teacher 1 lists {3: 0.4, 4: 0.3} (tail 0.3)
#   position 1, same support:      teacher 0 {5: 0.6, 6: 0.2}, teacher 1 {6: 0.5, 5: 0.3}
IDS = np.array([[[2, 1], [5, 6]],
                [[3, 4], [6, 5]]])
LPS = lp([[0.25, 0.5], [0.6, 0.2]],
         [[0.4, 0.3], [0.5, 0.3]])


def test_disjoint_teachers_mean_prob_union_and_tail():
    # position 0: union {1: .25, 2: .125, 3: .2, 4: .15}, tail (.25 + .3) / 2 = .275
    # position 1: union {5: .45, 6: .35}, tail .2, padded up to k_out=4
    out = ensemble_topk(IDS, LPS, k_out=4, vocab_size=V, mode="mean_prob")
    check(out, [[1, 3, 4, 2], [5, 6, PAD_ID, PAD_ID]],
          [[0.25, 0.2, 0.15, 0.125], [0.45, 0.35, 0, 0]], [0.275, 0.2])
    assert np.all(out[1][1, 2:] == np.float32(PAD_LOGPROB))


def test_cut_back_moves_the_rest_to_the_tail():
    # k_out=2 keeps {1, 3}; tokens 4 and 2 (.15 + .125) join the tail .275
    out = ensemble_topk(IDS, LPS, k_out=2, vocab_size=V, mode="mean_prob")
    check(out, [[1, 3], [5, 6]], [[0.25, 0.2], [0.45, 0.35]], [0.55, 0.2])
    out = ensemble_topk(IDS, LPS, k_out=1, vocab_size=V, mode="mean_prob", weights=[3, 1])
    # weights [3/4, 1/4]: position 0 -> {1: .375, 2: .1875, 3: .1, 4: .075}
    check(out, [[1], [5]], [[0.375], [0.525]], [0.625, 0.475])


def test_padding_when_union_is_smaller_than_k_out():
    # one teacher, one listed token: 1 real entry, 4 pads
    out = ensemble_topk(np.array([[[7]]]), lp([[0.75]]), k_out=5, vocab_size=V, mode="mean_prob")
    check(out, [[7, -1, -1, -1, -1]], [[0.75, 0, 0, 0, 0]], [0.25])
    assert out[1][0, 1:].tolist() == [PAD_LOGPROB] * 4 and np.isfinite(out[1]).all()


# one teacher, k=2: p = [36, 9] / 49, tail 4 / 49
SOFT_IDS = np.array([[[4, 7]]])
SOFT_LPS = lp([[36 / 49, 9 / 49]])


def test_temperature_softens_k_plus_one_buckets():
    # T=2: sqrt -> [6, 3, 2] / 7, renormalised over the three buckets -> [6, 3] / 11, tail 2 / 11
    out = ensemble_topk(SOFT_IDS, SOFT_LPS, k_out=2, vocab_size=V, mode="mean_prob", temperature=2.0)
    check(out, [[4, 7]], [[6 / 11, 3 / 11]], [2 / 11])
    # T=1/2: squares -> [1296, 81, 16] / 1393
    out = ensemble_topk(SOFT_IDS, SOFT_LPS, k_out=2, vocab_size=V, mode="mean_prob", temperature=0.5)
    check(out, [[4, 7]], [[1296 / 1393, 81 / 1393]], [16 / 1393])
    # T=1 leaves the teacher as it is
    check(ensemble_topk(SOFT_IDS, SOFT_LPS, k_out=2, vocab_size=V, mode="mean_prob"),
          [[4, 7]], [[36 / 49, 9 / 49]], [4 / 49])


@pytest.mark.parametrize("mode", MODES)
def test_identical_teachers_give_the_softened_teacher(mode):
    # position 0: [36, 9] / 49 -> T=2 -> [6, 3] / 11, tail 2/11
    # position 1: {9: 4/9, 0: 4/9}, tail 1/9 -> T=2 -> [.4, .4], tail .2 (tie: lower id first)
    one = (np.array([[4, 7], [9, 0]]), lp([36 / 49, 9 / 49], [4 / 9, 4 / 9]))
    ids, lps = np.stack([one[0]] * 3), np.stack([one[1]] * 3)
    out = ensemble_topk(ids, lps, k_out=2, vocab_size=V, mode=mode, temperature=2.0,
                        weights=[1, 2, 3], labels=np.array([7, 3]))
    check(out, [[4, 7], [0, 9]], [[6 / 11, 3 / 11], [0.4, 0.4]], [2 / 11, 0.2])
    for temperature in (1.0, 2.0):
        np.testing.assert_allclose(teacher_disagreement_topk(ids, lps, temperature), 0.0, atol=1e-7)


def test_mean_logit_uniform_tail_by_hand():
    # V=6, k=2. teacher 0 {0: 1/2, 1: 1/4}, teacher 1 {1: 1/2, 2: 1/4}, both tails 1/4, so an
    # unlisted token gets (1/4) / (6 - 2) = 1/16 from that teacher. Over union {0, 1, 2}:
    #   teacher 0 [1/2, 1/4, 1/16], teacher 1 [1/16, 1/2, 1/4]
    # geometric means [r/4, r/2, 1/8] (r = 1/sqrt2); the 3 tokens outside the union each get
    # sqrt(1/16 * 1/16) = 1/16 -> tail 3/16; then renormalise.
    ids = np.array([[[0, 1]], [[1, 2]]])
    lps = lp([[0.5, 0.25]], [[0.5, 0.25]])
    r = 1 / math.sqrt(2)
    z = 3 * r / 4 + 1 / 8 + 3 / 16
    out = ensemble_topk(ids, lps, k_out=3, vocab_size=6, mode="mean_logit")
    check(out, [[1, 0, 2]], [[r / 2 / z, r / 4 / z, 1 / 8 / z]], [3 / 16 / z])
    # weights [1, 0]: teacher 0 alone, its tail spread uniformly: token 2 gets 1/16 of it,
    # the 3 tokens outside the union 3/16
    out = ensemble_topk(ids, lps, k_out=3, vocab_size=6, mode="mean_logit", weights=[1, 0])
    check(out, [[0, 1, 2]], [[0.5, 0.25, 1 / 16]], [3 / 16])


# Best teacher / ca_mkd: V=10, k=2, teacher 0 lists {1: .5, 2: .1} (tail .4),
# teacher 1 lists {7: .02, 3: .9} (tail .08).
#   position 0, label 7: teacher 0 did not list it -> p = .4 / 8 = .05 > teacher 1's .02
#   position 1, label 3: teacher 0 -> .05, teacher 1 -> .9
CE_IDS = np.array([[[1, 2], [1, 2]], [[7, 3], [7, 3]]])
CE_LPS = lp([[0.5, 0.1], [0.5, 0.1]], [[0.02, 0.9], [0.02, 0.9]])
CE_LABELS = np.array([7, 3])


def test_best_teacher_counts_the_uniform_tail_for_an_unlisted_label():
    out = ensemble_topk(CE_IDS, CE_LPS, k_out=3, vocab_size=V, mode="best_teacher", labels=CE_LABELS)
    # the other teacher's tokens get probability 0 and are dropped (padded)
    check(out, [[1, 2, PAD_ID], [3, 7, PAD_ID]], [[0.5, 0.1, 0], [0.9, 0.02, 0]], [0.4, 0.08])
    # with a bigger vocabulary the unlisted share shrinks (.4 / 48 < .02): teacher 1 wins
    out = ensemble_topk(CE_IDS, CE_LPS, k_out=2, vocab_size=50, mode="best_teacher", labels=CE_LABELS)
    check(out, [[3, 7], [3, 7]], [[0.9, 0.02], [0.9, 0.02]], [0.08, 0.08])
    # the choice is made at T=1, the output is the chosen teacher softened at T=2:
    # sqrt([.5, .1, .4]) renormalised
    s = np.sqrt([0.5, 0.1, 0.4])
    s /= s.sum()
    out = ensemble_topk(CE_IDS, CE_LPS, k_out=2, vocab_size=V, mode="best_teacher", labels=CE_LABELS,
                        temperature=2.0)
    assert out[0][0].tolist() == [1, 2]
    np.testing.assert_allclose(np.exp(out[1][0]), s[:2], atol=1e-6)
    np.testing.assert_allclose(out[2][0], s[2], atol=1e-6)


def test_ca_mkd_closed_form():
    # M=2: w_i = p_i(y) / (p_0(y) + p_1(y)).
    # position 0: p(y) = .05, .02 -> w = [5/7, 2/7]
    #   {1: 5/14, 3: 9/35, 2: 1/14, 7: 1/175}, tail (5 * .4 + 2 * .08) / 7
    # position 1: p(y) = .05, .9 -> w = [1/19, 18/19]
    #   {3: 16.2/19, 1: .5/19, 7: .36/19, 2: .1/19}, tail (.4 + 18 * .08) / 19
    out = ensemble_topk(CE_IDS, CE_LPS, k_out=4, vocab_size=V, mode="ca_mkd", labels=CE_LABELS)
    check(out, [[1, 3, 2, 7], [3, 1, 7, 2]],
          [[5 / 14, 9 / 35, 1 / 14, 1 / 175], [16.2 / 19, 0.5 / 19, 0.36 / 19, 0.1 / 19]],
          [2.16 / 7, 1.84 / 19])
    # static weights are ignored, as in the dense mode
    same = ensemble_topk(CE_IDS, CE_LPS, k_out=4, vocab_size=V, mode="ca_mkd", labels=CE_LABELS,
                         weights=[1, 0])
    np.testing.assert_array_equal(same[1], out[1])


def test_entropy_mode_uses_k_plus_one_bucket_entropy():
    # teacher 0 [.5, .1 | .4], teacher 1 [.02, .9 | .08]: weights softmax(-H) over teachers
    def h(p):
        return -sum(x * math.log(x) for x in p)
    a, b = math.exp(-h([0.5, 0.1, 0.4])), math.exp(-h([0.02, 0.9, 0.08]))
    w0, w1 = a / (a + b), b / (a + b)
    out = ensemble_topk(CE_IDS[:, :1], CE_LPS[:, :1], k_out=4, vocab_size=V, mode="entropy")
    check(out, [[3, 1, 2, 7]], [[0.9 * w1, 0.5 * w0, 0.1 * w0, 0.02 * w1]], [0.4 * w0 + 0.08 * w1])
    assert w1 > 0.5  # the sharper teacher counts more


def random_topk(seed, m=3, n=20, k=5, vocab=50):
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((m, n, vocab)), axis=-1)[..., :k]  # distinct, unsorted
    probs = rng.dirichlet(np.ones(k + 1), size=(m, n))[..., :k]  # the last share is the tail
    return ids, np.log(probs), rng.integers(0, vocab, size=n)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k_out", [4, 12, 20])
def test_probabilities_and_tail_sum_to_one(mode, k_out):
    ids, lps, labels = random_topk(1)
    out_ids, out_lp, tail = ensemble_topk(ids, lps, k_out=k_out, vocab_size=50, mode=mode,
                                          temperature=1.7, labels=labels, weights=[1, 2, 0.5])
    assert out_ids.shape == out_lp.shape == (20, k_out) and tail.shape == (20,)
    np.testing.assert_allclose(np.exp(out_lp).sum(-1) + tail, 1.0, atol=1e-6)
    assert np.all((tail >= 0) & (tail <= 1))
    assert np.all(np.diff(out_lp, axis=1) <= 0)  # sorted by probability descending
    real = out_ids >= 0
    assert np.all(out_ids[real] < 50) and np.all(out_lp[~real] == np.float32(PAD_LOGPROB))
    if k_out == 20:  # the union of 3 x 5 tokens has at most 15: always padded
        assert (~real).sum(axis=1).min() >= 5
    for row in range(20):  # no token twice in a row
        assert len(set(out_ids[row][real[row]].tolist())) == real[row].sum()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_full_vocabulary_listing_matches_ensemble_dense(mode, temperature):
    # every teacher lists all 4 tokens (in its own order), so tails are 0 and the sparse
    # modes must agree with the dense ones
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=2.0, size=(3, 6, 4))
    labels = rng.integers(0, 4, size=6)
    ids = np.argsort(rng.random((3, 6, 4)), axis=-1)
    lps = np.take_along_axis(log_softmax(logits), ids, axis=-1)
    kwargs = dict(mode=mode, temperature=temperature, weights=[1, 2, 3], labels=labels, tau=0.7)
    out_ids, out_lp, tail = ensemble_topk(ids, lps, k_out=4, vocab_size=4, **kwargs)
    sparse = np.zeros((6, 4))
    np.put_along_axis(sparse, out_ids, np.exp(out_lp.astype(np.float64)), axis=1)
    np.testing.assert_allclose(sparse, ensemble_dense(logits, **kwargs), atol=1e-6)
    np.testing.assert_allclose(tail, 0.0, atol=1e-6)
    np.testing.assert_allclose(teacher_disagreement_topk(ids, lps, temperature),
                               teacher_disagreement(logits, temperature), atol=1e-6)


def test_disagreement_hand_values():
    # one-hot on different tokens, no tail: ln 2
    ids = np.array([[[0]], [[1]]])
    np.testing.assert_allclose(teacher_disagreement_topk(ids, np.zeros((2, 1, 1))), [LN2], atol=1e-7)
    # {0: 1/2 | 1/2} vs {1: 1/2 | 1/2}: mixture [1/4, 1/4 | 1/2], H = 1.5 ln 2; each H = ln 2
    out = teacher_disagreement_topk(ids, lp([[0.5]], [[0.5]]))
    assert out.dtype == np.float32 and out.shape == (1,)
    np.testing.assert_allclose(out, [0.5 * LN2], atol=1e-7)
    # {0: 1/2 | 1/2} vs {1: 0.8 | 0.2}: mixture [1/4, 0.4 | 0.35]
    def h(p):
        return -sum(x * math.log(x) for x in p)
    expected = h([0.25, 0.4, 0.35]) - (h([0.5, 0.5]) + h([0.8, 0.2])) / 2
    np.testing.assert_allclose(teacher_disagreement_topk(ids, lp([[0.5]], [[0.8]])), [expected], atol=1e-7)
    # per position, with the IDS/LPS fixture: position 1 has the same support, smaller JS
    js = teacher_disagreement_topk(IDS, LPS)
    assert js[0] > js[1] > 0


def test_topk_tail_mass():
    out = topk_tail_mass(lp([0.5, 0.25], [0.5, 0.5]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.25, 0.0], atol=1e-7)
    np.testing.assert_allclose(topk_tail_mass(np.array([math.log(0.5), PAD_LOGPROB])), 0.5, atol=1e-7)
    assert topk_tail_mass(np.log([[[0.6, 0.6]]])).tolist() == [[0.0]]  # over 1: clipped
    assert topk_tail_mass(LPS).shape == (2, 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ids=IDS[0]), "3-D"),
    (dict(logprobs=LPS[:, :1]), "same shape|of one shape"),
    (dict(ids=IDS.astype(float)), "must be integers"),
    (dict(ids=-IDS), "must be >= 0"),
    (dict(ids=np.array([[[1, 1], [5, 6]], [[3, 4], [6, 5]]])), "same token id twice"),
    (dict(vocab_size=5), "vocab_size 5 must exceed every token id, got id 6"),
    (dict(vocab_size=0), "vocab_size must be an integer >= 1"),
    (dict(k_out=0), "k_out must be an integer >= 1"),
    (dict(k_out=2.5), "k_out must be an integer >= 1"),
    (dict(logprobs=np.full((2, 2, 2), np.nan)), "NaN or inf"),
    (dict(logprobs=LPS + 1.0), "sum to .* > 1"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(tau=-1.0), "tau must be > 0"),
    (dict(weights=[1, 2, 3]), "3 entries but there are 2 teachers"),
    (dict(mode="median"), "unknown ensemble mode 'median'"),
    (dict(mode="ca_mkd"), "ensemble mode 'ca_mkd' needs ground-truth labels"),
    (dict(mode="best_teacher", labels=np.array([0, 10])), r"labels must lie in \[0, 10\)"),
    (dict(mode="best_teacher", labels=np.array([0])), "labels must be 2 integers"),
])
def test_bad_arguments(kwargs, match):
    args = dict(ids=IDS, logprobs=LPS, k_out=2, vocab_size=V, mode="mean_prob")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ensemble_topk(args.pop("ids"), args.pop("logprobs"), **args)
