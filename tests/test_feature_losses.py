"""Feature and relation losses pinned against values worked out by hand in the comments."""
import math

import pytest
import torch

from orchestrator.config import config_from_dict
from orchestrator.errors import DistillError
from orchestrator.feature_losses import (AttentionTransfer, ExtraLoss, HintLoss, RKDAngle, RKDDistance,
                                         SimilarityPreserving, build_extra_loss)

R2 = math.sqrt(2)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def check(value, expected, tol=1e-9):
    assert value.dim() == 0
    assert value.item() == pytest.approx(expected, abs=tol)


def fixed_hint(distance):
    """Projection 2 -> 3 with W = [[1, 0], [0, 1], [1, 1]], b = 0: s = [a, b] -> [a, b, a + b]."""
    loss = HintLoss(2, 3, distance).double()
    with torch.no_grad():
        loss.proj.weight.copy_(t([[1, 0], [0, 1], [1, 1]]))
        loss.proj.bias.zero_()
    return loss


# --- hint (FitNets) ---

def test_hint_projection_shapes():
    loss = HintLoss(4, 6)
    assert tuple(loss.proj.weight.shape) == (6, 4) and tuple(loss.proj.bias.shape) == (6,)
    assert loss.proj(torch.zeros(5, 4)).shape == (5, 6)
    assert loss.proj(torch.zeros(5, 7, 4)).shape == (5, 7, 6)
    assert loss(torch.randn(5, 4), torch.randn(5, 6)).dim() == 0
    assert loss(torch.randn(5, 7, 4), torch.randn(5, 7, 6), torch.ones(5, 7)).dim() == 0


def test_hint_mse_hand_value():
    # s = [1, 2] -> [1, 2, 3]; t = [1, 0, 3]; diff [0, 2, 0] -> mean of squares 4/3
    check(fixed_hint("mse")(t([[1, 2]]), t([[1, 0, 3]])), 4 / 3)


def test_hint_cosine_hand_value():
    # [1, 2, 3] . [1, 0, 3] = 10; norms sqrt(14), sqrt(10): 1 - 10 / sqrt(140)
    check(fixed_hint("cosine")(t([[1, 2]]), t([[1, 0, 3]])), 1 - 10 / math.sqrt(140))
    # parallel vectors of any length: distance 0
    check(fixed_hint("cosine")(t([[1, 1]]), t([[4, 4, 8]])), 0.0)


def test_hint_token_mask_drops_padded_positions():
    # position 0 as above (4/3); position 1 is padding with a wild teacher value: ignored
    s, tt = t([[[1, 2], [0, 0]]]), t([[[1, 0, 3], [100, 100, 100]]])
    check(fixed_hint("mse")(s, tt, torch.tensor([[1, 0]])), 4 / 3)
    # unmasked: mean of 4/3 and (100^2 * 3) / 3 = 10000
    check(fixed_hint("mse")(s, tt), (4 / 3 + 10000) / 2)


def test_hint_gradient_reaches_the_projection():
    torch.manual_seed(0)
    loss = HintLoss(3, 5)
    student = torch.randn(4, 3, requires_grad=True)
    loss(student, torch.randn(4, 5)).backward()
    assert loss.proj.weight.grad is not None and loss.proj.weight.grad.abs().sum() > 0
    assert loss.proj.bias.grad.abs().sum() > 0
    assert student.grad.abs().sum() > 0


def test_hint_float16_teacher_features():
    loss = fixed_hint("mse").float()
    check(loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 0, 3]], dtype=torch.float16)), 4 / 3, 1e-6)


# --- attention transfer ---

def test_attention_transfer_maps_hand_value():
    # student, 1 head: [[1, 0], [0, 1]] -> [1, 0, 0, 1] / sqrt 2
    # teacher, 2 heads both [[1, 0], [1, 0]] -> head mean the same -> [1, 0, 1, 0] / sqrt 2
    # difference [0, 0, -1, 1] / sqrt 2 has L2 norm 1
    s = t([[[[1, 0], [0, 1]]]])
    tt = t([[[[1, 0], [1, 0]], [[1, 0], [1, 0]]]])
    check(AttentionTransfer("attention")(s, tt), 1.0)
    check(AttentionTransfer("attention")(tt, tt), 0.0)


def test_attention_transfer_mask_drops_padded_rows_and_columns():
    # position 1 is padding: only entry (0, 0) is left in both maps -> [1, 0, 0, 0] each: distance 0
    s = t([[[[1, 0], [0, 1]]]])
    tt = t([[[[0.5, 0.5], [1, 0]]]])
    check(AttentionTransfer("attention")(s, tt, torch.tensor([[1, 0]])), 0.0)


def test_attention_transfer_activations_hand_value():
    # student tokens [3, 4], [0, 0] -> sum of squares [25, 0] -> [1, 0]
    # teacher tokens [1], [1] -> [1, 1] -> [1, 1] / sqrt 2
    # ||[1 - 1/sqrt2, -1/sqrt2]|| = sqrt((1 - 1/sqrt2)^2 + 1/2) = sqrt(2 - sqrt 2)
    s, tt = t([[[3, 4], [0, 0]]]), t([[[1], [1]]])
    check(AttentionTransfer("activation")(s, tt), math.sqrt(2 - R2))
    # masking position 1 leaves [1] vs [1]: 0
    check(AttentionTransfer("activation")(s, tt, torch.tensor([[1, 0]])), 0.0)


# --- RKD on three points ---

def test_rkd_distance_three_points_hand_value():
    # student: a 3-4-5 triangle (0,0), (3,0), (0,4): distances d01 3, d02 4, d12 5, mean 4
    #   psi = 0.75, 1, 1.25
    # teacher: three points on a line 0, 1, 2: distances 1, 2, 1, mean 4/3 -> psi = 0.75, 1.5, 0.75
    # differences 0, -0.5, 0.5 (all < 1: Huber 0.5 x^2) -> 0, 0.125, 0.125; mean over the pairs 1/12
    s, tt = t([[0, 0], [3, 0], [0, 4]]), t([[0], [1], [2]])
    check(RKDDistance()(s, tt), 1 / 12, 1e-7)


def test_rkd_distance_huber_linear_part():
    # student on a line 0, 0, 1: distances d01 0, d02 1, d12 1, mean 2/3 -> psi 0, 1.5, 1.5
    # teacher 0, 1, 1: distances 1, 1, 0 -> psi 1.5, 1.5, 0; differences -1.5, 0, 1.5
    # |x| >= 1: Huber |x| - 0.5 = 1, 0, 1 -> mean 2/3
    check(RKDDistance()(t([[0], [0], [1]]), t([[0], [1], [1]])), 2 / 3, 1e-5)


def test_rkd_distance_is_scale_free():
    s = t([[0, 0], [3, 0], [0, 4]])
    check(RKDDistance()(s, 10 * s + 7), 0.0, 1e-7)


def test_rkd_angle_three_points_hand_value():
    # teacher: right isosceles (0,0), (1,0), (0,1): angle 90 deg at point 0 (cos 0), 45 deg at 1 and 2
    #   (cos sqrt2/2); student: equilateral (0,0), (2,0), (1,sqrt3): cos 1/2 at every vertex.
    # Each vertex is the middle of 2 ordered triplets, so the mean is over the three vertices:
    #   vertex 0: (1/2 - 0)^2 / 2 = 1/8; vertices 1, 2: (sqrt2/2 - 1/2)^2 / 2 = (3/4 - sqrt2/2) / 2
    #   mean = (1/8 + 3/4 - sqrt2/2) / 3 = (7/8 - sqrt2/2) / 3
    s = t([[0, 0], [2, 0], [1, math.sqrt(3)]])
    tt = t([[0, 0], [1, 0], [0, 1]])
    check(RKDAngle()(s, tt), (7 / 8 - R2 / 2) / 3, 1e-9)


def test_rkd_gradients_flow_and_need_pooled_features():
    s = t([[0, 0], [2, 0], [1, 1.5]]).requires_grad_()
    (RKDAngle()(s, t([[0, 0], [1, 0], [0, 1]])) + RKDDistance()(s, t([[0], [1], [3]]))).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pooled"):
        RKDDistance()(torch.zeros(3, 4, 2), torch.zeros(3, 4, 2))
    with pytest.raises(ValueError, match=">= 3"):
        RKDAngle()(torch.zeros(2, 2), torch.zeros(2, 2))


# --- similarity preserving ---

def test_similarity_preserving_hand_value():
    # teacher rows [1, 0], [0, 1]: G = I, rows already unit.
    # student rows [1, 0], [1, 0]: G = all ones, each row normalised to [1, 1] / sqrt 2.
    # ||G_s - G_t||_F^2 = 2 ((1 - 1/sqrt2)^2 + 1/2) = 2 (2 - sqrt 2); / B^2 = 4 -> 1 - sqrt2 / 2
    check(SimilarityPreserving()(t([[1, 0], [1, 0]]), t([[1, 0], [0, 1]])), 1 - R2 / 2)
    # different widths are fine: only B x B Gram matrices are compared
    check(SimilarityPreserving()(t([[2, 0, 0], [0, 0, 5]]), t([[1, 0], [0, 1]])), 0.0)


def test_similarity_preserving_token_mask():
    # token features flattened per sample; padding position 1 holds values that would change G
    s = t([[[1, 0], [0, 9]], [[1, 0], [0, 0]]])
    tt = t([[[1, 0], [5, 5]], [[0, 1], [0, 0]]])
    mask = torch.tensor([[1, 0], [1, 0]])
    # masked: student rows [1,0,0,0], [1,0,0,0] and teacher [1,0,0,0], [0,1,0,0]: as above
    check(SimilarityPreserving()(s, tt, mask), 1 - R2 / 2)
    assert abs(SimilarityPreserving()(s, tt).item() - (1 - R2 / 2)) > 1e-3


# --- builder and config ---

SPEC = {"kind": "hint", "weight": 0.5, "teacher": "mlp", "teacher_layer": 2, "student_layer": "hidden.0"}


def test_build_extra_loss_kinds_and_weight():
    term = build_extra_loss(SPEC, student_dim=2, teacher_dim=3)
    assert isinstance(term, ExtraLoss) and isinstance(term.loss, HintLoss) and term.loss.distance == "mse"
    assert (term.teacher, term.teacher_layer, term.student_layer, term.weight) == ("mlp", 2, "hidden.0", 0.5)
    assert sum(p.numel() for p in term.parameters()) == 3 * 2 + 3  # the projection, trained with the student
    with torch.no_grad():
        term.loss.proj.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1]]))
        term.loss.proj.bias.zero_()
    check(term(torch.tensor([[1.0, 2]]), torch.tensor([[1.0, 0, 3]])), 0.5 * 4 / 3, 1e-6)
    base = {k: v for k, v in SPEC.items() if k != "kind"}
    for kind, cls in [("attention", AttentionTransfer), ("rkd_distance", RKDDistance), ("rkd_angle", RKDAngle),
                      ("similarity", SimilarityPreserving)]:
        term = build_extra_loss({**base, "kind": kind})
        assert isinstance(term.loss, cls) and not list(term.parameters())
    assert build_extra_loss({**base, "kind": "attention", "source": "activation"}).loss.source == "activation"
    # RKD terms ignore a mask argument (they compare samples, not positions)
    term = build_extra_loss({**base, "kind": "rkd_distance", "weight": 2})
    check(term(t([[0, 0], [3, 0], [0, 4]]), t([[0], [1], [2]]), None), 2 / 12, 1e-7)


@pytest.mark.parametrize("change, field", [
    ({"kind": "fitnet"}, "kind"),
    ({"weight": -1}, "weight"),
    ({"weight": "heavy"}, "weight"),
    ({"teacher": None}, "teacher"),
    ({"teacher_layer": None}, "teacher_layer"),
    ({"student_layer": [1]}, "student_layer"),
    ({"distance": "l1"}, "distance"),
    ({"kind": "rkd_angle", "distance": "mse"}, "distance"),
    ({"kind": "attention", "source": "pixels"}, "source"),
    ({"source": "attention"}, "source"),
    ({"layer": 3}, "layer"),
])
def test_bad_spec_names_the_field(change, field):
    with pytest.raises(DistillError) as e:
        build_extra_loss({**SPEC, **change}, student_dim=2, teacher_dim=3)
    msg = str(e.value)
    assert msg.startswith(f"train.extra_losses.{field}:") and "\n" not in msg


def test_hint_needs_widths():
    with pytest.raises(DistillError, match=r"^train.extra_losses.teacher_layer: hint needs the feature width"):
        build_extra_loss(SPEC, student_dim=2, teacher_dim=None)


def _config(extra):
    return {"dataset": {"source": "sklearn:digits"}, "teachers": [
        {"name": "mlp", "backend": "torch", "path": "x.pt", "module": "m:C", "features": ["2", "net.0"]},
        {"name": "bert", "backend": "hf", "path": "b", "features": [2]}], "train": {"extra_losses": extra}}


def test_config_checks_extra_losses():
    spec = {**SPEC, "teacher_layer": "net.0"}
    cfg = config_from_dict(_config([spec, {**SPEC, "kind": "similarity", "teacher": "bert"}]))
    assert cfg.train.extra_losses[1]["teacher"] == "bert"
    # ensemble: every teacher must capture the layer (here "2" for mlp but 2 for bert: not the same)
    with pytest.raises(DistillError, match=r"^cfg: train.extra_losses.0.teacher_layer: teacher 'bert' does not capture 'net.0'"):
        config_from_dict(_config([{**spec, "teacher": "ensemble"}]), source="cfg")
    with pytest.raises(DistillError, match=r"^cfg: train.extra_losses.0.teacher_layer: teacher 'mlp' does not capture 2;"):
        config_from_dict(_config([SPEC]), source="cfg")
    assert config_from_dict(_config([])).train.extra_losses == []
    with pytest.raises(DistillError, match=r"^cfg: train.extra_losses.1.teacher: no teacher named 'big'"):
        config_from_dict(_config([spec, {**SPEC, "teacher": "big"}]), source="cfg")
    with pytest.raises(DistillError, match=r"^cfg: train.extra_losses.0.kind: "):
        config_from_dict(_config([{**SPEC, "kind": "hints"}]), source="cfg")
