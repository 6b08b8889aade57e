"""Ensemble modes pinned against hand-computed values.

Logits are written as logs of simple ratios so the softened distributions are exact
fractions: softmax([0, ln 3]) = [1/4, 3/4], softmax([ln 4, 0]) = [4/5, 1/5].
"""
import math

import numpy as np
import pytest

from orchestrator.ensemble import MODES, NEEDS_LABELS, ensemble_dense, log_softmax, teacher_disagreement

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)
SQ3 = math.sqrt(3)

# [M=2, B=2, C=2]; at T=1:
#   teacher 0: sample 0 -> [1/4, 3/4], sample 1 -> [1/2, 1/2]
#   teacher 1: sample 0 -> [1/2, 1/2], sample 1 -> [4/5, 1/5]
LOGITS = np.array([[[0.0, LN3], [0.0, 0.0]],
                   [[0.0, 0.0], [LN4, 0.0]]])
T0 = np.array([[0.25, 0.75], [0.5, 0.5]])
T1 = np.array([[0.5, 0.5], [0.8, 0.2]])
LABELS = np.array([1, 0])


def h(q):
    """Binary entropy in nats."""
    return -(q * math.log(q) + (1 - q) * math.log(1 - q))


def close(actual, expected, atol=1e-6):
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, np.asarray(expected, dtype=np.float64), rtol=0, atol=atol)


def test_log_softmax_is_stable_for_huge_logits():
    out = log_softmax(np.array([1000.0, 1000.0 + LN3]))
    np.testing.assert_allclose(out, [math.log(0.25), math.log(0.75)], atol=1e-12)


def test_mean_prob():
    close(ensemble_dense(LOGITS, mode="mean_prob"), [[0.375, 0.625], [0.65, 0.35]])


def test_mean_prob_static_weights():
    close(ensemble_dense(LOGITS, mode="mean_prob", weights=[3, 1]), [[0.3125, 0.6875], [0.575, 0.425]])
    close(ensemble_dense(LOGITS, mode="mean_prob", weights=[1, 0]), T0)


def test_mean_prob_temperature():
    # T=2 halves the logits: softmax([0, ln3 / 2]) = [1, sqrt3] / (1 + sqrt3); softmax([ln2, 0]) = [2/3, 1/3]
    t0 = np.array([[1 / (1 + SQ3), SQ3 / (1 + SQ3)], [0.5, 0.5]])
    t1 = np.array([[0.5, 0.5], [2 / 3, 1 / 3]])
    close(ensemble_dense(LOGITS, mode="mean_prob", temperature=2.0), (t0 + t1) / 2)


def test_mean_logit_is_normalised_geometric_mean():
    # equal weights: mean logits [0, ln3/2] and [ln2, 0]
    close(ensemble_dense(LOGITS, mode="mean_logit"),
          [[1 / (1 + SQ3), SQ3 / (1 + SQ3)], [2 / 3, 1 / 3]])
    # weights [3/4, 1/4]: class ratio 3^(3/4) in sample 0, 4^(1/4) = sqrt2 in sample 1
    r0, r1 = 3 ** 0.75, math.sqrt(2)
    close(ensemble_dense(LOGITS, mode="mean_logit", weights=[3, 1]),
          [[1 / (1 + r0), r0 / (1 + r0)], [r1 / (1 + r1), 1 / (1 + r1)]])


def test_entropy_mode_hand_value():
    # sample 0: H(teacher0) = h(1/4), H(teacher1) = ln 2; sample 1: ln 2 and h(4/5)
    a0, b0 = math.exp(-h(0.25)), 0.5
    a1, b1 = 0.5, math.exp(-h(0.8))
    w0, w1 = a0 / (a0 + b0), b1 / (a1 + b1)  # weight of the sharper teacher
    expected = [w0 * T0[0] + (1 - w0) * T1[0], (1 - w1) * T0[1] + w1 * T1[1]]
    close(ensemble_dense(LOGITS, mode="entropy"), expected)


def test_entropy_mode_tau_and_static_weights():
    # tau=0.5 squares the exp(-H) factors; static weights [1, 3] multiply them
    a0, b0 = math.exp(-2 * h(0.25)), 3 * 0.25
    w0 = a0 / (a0 + b0)
    out = ensemble_dense(LOGITS, mode="entropy", tau=0.5, weights=[1, 3])
    close(out[0], w0 * T0[0] + (1 - w0) * T1[0])


def test_entropy_mode_favours_the_confident_teacher():
    out = ensemble_dense(LOGITS, mode="entropy")
    mean = ensemble_dense(LOGITS, mode="mean_prob")
    # sample 0: teacher 0 is sharper (class 1); sample 1: teacher 1 is sharper (class 0)
    assert out[0, 1] > mean[0, 1] and out[1, 0] > mean[1, 0]
    # very small tau -> only the sharpest teacher; very large tau -> plain mean
    close(ensemble_dense(LOGITS, mode="entropy", tau=1e-3), [T0[0], T1[1]])
    close(ensemble_dense(LOGITS, mode="entropy", tau=1e6), mean)


def test_best_teacher_picks_lowest_label_ce():
    # sample 0 label 1: teacher 0 gives 3/4 vs 1/2; sample 1 label 0: teacher 1 gives 4/5 vs 1/2
    close(ensemble_dense(LOGITS, mode="best_teacher", labels=LABELS), [T0[0], T1[1]])
    # static weights do not change the choice
    close(ensemble_dense(LOGITS, mode="best_teacher", labels=LABELS, weights=[0, 1]), [T0[0], T1[1]])


def test_best_teacher_is_not_simply_the_most_confident():
    # label 1. teacher 0: [9, 1, 1]/11, very confident but wrong; teacher 1: [1/4, 1/2, 1/4]
    logits = np.array([[[math.log(9), 0.0, 0.0]], [[0.0, LN2, 0.0]]])
    labels = np.array([1])
    close(ensemble_dense(logits, mode="best_teacher", labels=labels), [[0.25, 0.5, 0.25]])
    # the choice uses CE at T=1, the output is the chosen teacher softened at T=2
    s2 = math.sqrt(2)
    close(ensemble_dense(logits, mode="best_teacher", labels=labels, temperature=2.0),
          [[1 / (2 + s2), s2 / (2 + s2), 1 / (2 + s2)]])


def test_best_teacher_tie_goes_to_lowest_index():
    # label 0: both teachers give exactly 1/2 to it, but disagree on the rest
    logits = np.array([[[0.0, 0.0, -1000.0]], [[0.0, -1000.0, 0.0]]])
    close(ensemble_dense(logits, mode="best_teacher", labels=np.array([0])), [[0.5, 0.5, 0.0]])


def test_ca_mkd_two_teachers():
    # M=2: w_i = 1 - softmax(CE)_i = p_i(y) / (p_0(y) + p_1(y))
    # sample 0: p(y) = 3/4, 1/2 -> w = [0.6, 0.4]; sample 1: p(y) = 1/2, 4/5 -> w = [5/13, 8/13]
    expected = [0.6 * T0[0] + 0.4 * T1[0], (0.5 * T0[1] + 0.8 * T1[1]) / 1.3]
    close(ensemble_dense(LOGITS, mode="ca_mkd", labels=LABELS), expected)
    close(ensemble_dense(LOGITS, mode="ca_mkd", labels=LABELS, weights=[1, 0]), expected)


def test_ca_mkd_three_teachers_closed_form_and_temperature():
    # label 0 gets p = 1/2, 1/4, 1/8 -> exp(CE) = 2, 4, 8 -> softmax(CE) = [1, 2, 4] / 7
    # -> w = (1 - [1, 2, 4] / 7) / 2 = [3/7, 5/14, 3/14]
    logits = np.array([[[0.0, 0.0]], [[0.0, LN3]], [[0.0, math.log(7)]]])
    w = np.array([3 / 7, 5 / 14, 3 / 14])
    p1 = np.array([[0.5, 0.5], [0.25, 0.75], [0.125, 0.875]])
    labels = np.array([0])
    close(ensemble_dense(logits, mode="ca_mkd", labels=labels), [w @ p1])
    # at T=2 the weights still come from CE at T=1; only the distributions soften
    s3, s7 = SQ3, math.sqrt(7)
    p2 = np.array([[0.5, 0.5], [1 / (1 + s3), s3 / (1 + s3)], [1 / (1 + s7), s7 / (1 + s7)]])
    close(ensemble_dense(logits, mode="ca_mkd", labels=labels, temperature=2.0), [w @ p2])


def test_ca_mkd_single_teacher_is_that_teacher():
    close(ensemble_dense(LOGITS[:1], mode="ca_mkd", labels=LABELS), T0)


@pytest.mark.parametrize("mode", MODES)
def test_rows_sum_to_one_and_shape(mode):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=5.0, size=(3, 7, 5))
    labels = rng.integers(0, 5, size=7)
    out = ensemble_dense(logits, mode=mode, temperature=2.5, labels=labels)
    assert out.shape == (7, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)
    assert np.all(out >= 0)


@pytest.mark.parametrize("mode", NEEDS_LABELS)
def test_label_modes_need_labels(mode):
    with pytest.raises(ValueError, match=f"ensemble mode '{mode}' needs ground-truth labels"):
        ensemble_dense(LOGITS, mode=mode)


def test_unknown_mode_names_it_and_lists_modes():
    with pytest.raises(ValueError, match="'median'.*mean_prob.*ca_mkd"):
        ensemble_dense(LOGITS, mode="median")


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights=[1, 2, 3]), "3 entries but there are 2 teachers"),
    (dict(weights=[1, -1]), "non-negative"),
    (dict(weights=[0, 0]), "all zero"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(tau=0.0), "tau must be > 0"),
    (dict(mode="best_teacher", labels=[0, 2]), r"labels must lie in \[0, 2\)"),
    (dict(mode="best_teacher", labels=[0]), "labels must be 2 integers"),
])
def test_bad_arguments(kwargs, match):
    kwargs = {"mode": "mean_prob", **kwargs}
    with pytest.raises(ValueError, match=match):
        ensemble_dense(LOGITS, **kwargs)


def test_logits_must_be_3d():
    with pytest.raises(ValueError, match="3-D"):
        ensemble_dense(LOGITS[0], mode="mean_prob")
    with pytest.raises(ValueError, match="3-D"):
        teacher_disagreement(LOGITS[0])


def test_disagreement_zero_for_identical_teachers():
    logits = np.repeat(np.array([[[1.0, -2.0, 0.5], [3.0, 0.0, 0.0]]]), 3, axis=0)
    out = teacher_disagreement(logits)
    assert out.shape == (2,) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.0, atol=1e-7)


def test_disagreement_opposite_one_hot_is_ln2():
    logits = np.array([[[50.0, -50.0]], [[-50.0, 50.0]]])
    np.testing.assert_allclose(teacher_disagreement(logits), [LN2], atol=1e-6)
    # three teachers each sure of a different class: ln 3
    logits3 = 100.0 * np.eye(3)[:, None, :]
    np.testing.assert_allclose(teacher_disagreement(logits3), [math.log(3)], atol=1e-6)


def test_disagreement_hand_value_and_temperature():
    # [1/4, 3/4] vs [3/4, 1/4]: mean is uniform -> ln2 - h(1/4)
    expected = LN2 - h(0.25)
    logits = np.array([[[0.0, LN3]], [[LN3, 0.0]]])
    np.testing.assert_allclose(teacher_disagreement(logits), [expected], atol=1e-6)
    # same distributions reached from doubled logits at T=2
    np.testing.assert_allclose(teacher_disagreement(2 * logits, temperature=2.0), [expected], atol=1e-6)
    # per-sample: sample 0 of LOGITS is [1/4,3/4] vs [1/2,1/2]
    m = 0.375
    np.testing.assert_allclose(teacher_disagreement(LOGITS)[0], h(m) - (h(0.25) + LN2) / 2, atol=1e-6)
