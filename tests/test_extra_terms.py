"""train.extra_losses wired into the classification step (orchestrator/extra_terms.py): which
student output and stored teacher column each term reads, hand-computed values and gradients on
a tiny MLP, a transformer student's hidden states and attention maps, and the checks that give one
error line. No Ray here; tests/test_extra_terms_pipeline.py runs it on Ray Train."""
from __future__ import annotations

import pytest
import torch

from orchestrator.errors import DistillError
from orchestrator.extra_terms import ExtraTerms, check_student_layers, resolve_terms
from orchestrator.feature_losses import HintLoss
from orchestrator.models import MLPStudent, build_student

MLP = {"arch": "mlp", "in_dim": 2, "num_classes": 2, "hidden": [2]}
BERT = {"arch": "hf", "init": "scratch", "num_classes": 3,
        "config": {"model_type": "bert", "vocab_size": 17, "hidden_size": 8, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16,
                   "type_vocab_size": 1, "num_labels": 3, "hidden_dropout_prob": 0.0,
                   "attention_probs_dropout_prob": 0.0}}


def _hint(**kw):
    return {"kind": "hint", "weight": 0.5, "teacher": "t", "teacher_layer": "net.0", "student_layer": "net.1", **kw}


def _mlp():
    """in 2 -> Linear (identity) -> ReLU -> Linear (identity): hand-checkable activations."""
    torch.manual_seed(0)
    m = MLPStudent(2, 2, [2])
    with torch.no_grad():
        for lin in (m.net[0], m.net[2]):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    return m


def _identity_projections(terms):
    with torch.no_grad():
        for mod in terms.modules():
            if isinstance(mod, HintLoss):
                mod.proj.weight.copy_(torch.eye(*mod.proj.weight.shape))
                mod.proj.bias.zero_()


X = torch.tensor([[1.0, 2.0], [3.0, -1.0]])  # net.1 (ReLU) gives [[1, 2], [3, 0]]
T = torch.tensor([[1.0, 0.0], [3.0, 2.0]], dtype=torch.float16)  # the stored teacher feature


def test_hint_on_an_mlp_module_by_hand():
    """weight 0.5 x mean over rows of mean over dims of (s - t)^2: diff [[0, 2], [0, -2]] -> 0.5 x 2 = 1.
    Gradients (identity projection): d/dP = 0.25 * sum_i diff_i s_i^T = [[0, 0], [-1, 1]]; back through
    ReLU (row 1's second unit is off) to net.0: 0.25 * sum_i (diff_i * relu') x_i^T = [[0, 0], [0.5, 1]]."""
    model = _mlp()
    resolved = resolve_terms([_hint()], [{"name": "t", "features": ["net.0"], "pool": "mean"}],
                             {"feat__t__net.0": [2]}, MLP, 2)
    assert resolved[0]["parts"][0]["column"] == "feat__t__net.0"
    assert resolved[0]["label"] == "hint x0.5: t/net.0 -> student module net.1, projection 2->2"
    terms = ExtraTerms(resolved, model)
    _identity_projections(terms)
    logits, extra = terms.step(model, X, {"feat__t__net.0": T})
    assert torch.equal(logits, torch.tensor([[1.0, 2.0], [3.0, 0.0]]))  # the same forward's logits
    assert extra.item() == pytest.approx(1.0)
    extra.backward()
    proj = terms.losses[0][0].loss.proj
    assert torch.allclose(proj.weight.grad, torch.tensor([[0.0, 0.0], [-1.0, 1.0]]))
    assert torch.allclose(model.net[0].weight.grad, torch.tensor([[0.0, 0.0], [0.5, 1.0]]))
    assert model.net[2].weight.grad is None  # the head is not on the hint's path
    assert terms.pop_means() == {resolved[0]["label"]: pytest.approx(1.0)}


def test_the_response_loss_gets_the_term_added():
    """actors/student.py's classifier step: response loss + the terms, from one forward."""
    from actors.student import _classifier_step
    from orchestrator.losses import build_loss

    model = _mlp()
    resolved = resolve_terms([_hint()], [{"name": "t", "features": ["net.0"], "pool": "mean"}],
                             {"feat__t__net.0": [2]}, MLP, 2)
    terms = ExtraTerms(resolved, model)
    _identity_projections(terms)
    loss_fn = build_loss("kd", alpha=0.1, temperature=2.0)
    soft = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    batch = {"features": X, "label": torch.tensor([1, 0]), "soft.probs": soft, "feat__t__net.0": T}
    config = {"student": MLP}
    plain, n = _classifier_step(model, loss_fn, batch, config)
    both, _ = _classifier_step(model, loss_fn, batch, config, terms)
    assert n == 2 and both.item() == pytest.approx(plain.item() + 1.0, abs=1e-6)


def test_ensemble_is_the_mean_over_teachers():
    """Two teachers at the same layer: one projection each, the term the mean of both hints."""
    model = _mlp()
    teachers = [{"name": "a", "features": ["net.0"], "pool": "mean"}, {"name": "b", "features": ["net.0"], "pool": "mean"}]
    resolved = resolve_terms([_hint(teacher="ensemble", weight=1.0)], teachers,
                             {"feat__a__net.0": [2], "feat__b__net.0": [2]}, MLP, 2)
    terms = ExtraTerms(resolved, model)
    _identity_projections(terms)
    assert len(list(terms.parameters())) == 4  # two projections (weight + bias each)
    s = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    _, extra = terms.step(model, X, {"feat__a__net.0": s.half(), "feat__b__net.0": T})
    assert extra.item() == pytest.approx((0.0 + 2.0) / 2)  # a: exact (0), b: 2 (as above)


def test_relation_terms_skip_a_batch_too_small():
    model = _mlp()
    spec = {"kind": "rkd_angle", "teacher": "t", "teacher_layer": "net.0", "student_layer": "net.1"}
    terms = ExtraTerms(resolve_terms([spec], [{"name": "t", "features": ["net.0"], "pool": "mean"}],
                                     {"feat__t__net.0": [2]}, MLP, 2), model)
    _, extra = terms.step(model, X, {"feat__t__net.0": T})  # 2 samples: no angle
    assert extra.item() == 0.0 and not list(terms.parameters())


def test_transformer_student_hidden_states_and_attention_maps():
    """arch hf: hidden state 1 mean-pooled (as the teacher's pool: mean) for a hint, layer 0's
    attention maps for attention transfer, one forward with the logits of cls_logits."""
    from orchestrator.cls_students import cls_logits
    from orchestrator.feature_losses import AttentionTransfer

    torch.manual_seed(0)
    model = build_student(BERT)
    specs = [{"kind": "hint", "teacher": "t", "teacher_layer": "2", "student_layer": 1},
             {"kind": "attention", "weight": 2.0, "teacher": "t", "teacher_layer": "attn", "student_layer": 0}]
    teachers = [{"name": "t", "features": ["2", "attn"], "pool": "mean"}]
    resolved = resolve_terms(specs, teachers, {"feat__t__2": [4], "feat__t__attn": [3, 6, 6]}, BERT, 6)
    assert [r["student"] for r in resolved] == [{"kind": "hidden", "key": 1, "shape": [6, 8]},
                                                {"kind": "attention", "key": 0, "shape": [2, 6, 6]}]
    terms = ExtraTerms(resolved, model)
    model.eval()
    ids = torch.randint(1, 17, (3, 6)).float()
    t_hint, t_attn = torch.randn(3, 4).half(), torch.softmax(torch.randn(3, 3, 6, 6), -1).half()
    logits, extra = terms.step(model, ids, {"feat__t__2": t_hint, "feat__t__attn": t_attn})
    with torch.no_grad():
        assert torch.allclose(logits, cls_logits(model, ids), atol=1e-5)
        out = model(input_ids=ids.long(), output_hidden_states=True, output_attentions=True)
        want = terms.losses[0][0].loss(out.hidden_states[1].mean(1), t_hint) + \
            2.0 * AttentionTransfer()(out.attentions[0], t_attn)
    assert extra.item() == pytest.approx(want.item(), rel=1e-5)
    # the projection is the terms' own: the student's state (what is exported) has none of it
    assert set(terms.state_dict()) == {"losses.0.0.loss.proj.weight", "losses.0.0.loss.proj.bias"}
    assert not any("proj" in k for k in model.state_dict())


@pytest.mark.parametrize("spec, student, expect", [
    ({"student_layer": 3}, BERT, r"train\.extra_losses\.0\.student_layer: index 3 out of range: the student has 3 "
                                 r"hidden states \(0 = embeddings \.\. 2\)"),
    ({"student_layer": -4}, BERT, r"index -4 out of range"),
    ({"student_layer": "bert.encoder"}, BERT, r"student\.arch hf takes a hidden-state index"),
    ({"kind": "attention", "student_layer": 2}, BERT, r"attention maps index 2 out of range: the student has 2 layers"),
    ({"student_layer": "net.7"}, MLP, r"student\.arch mlp takes a module name \(net, net\.0, net\.1, net\.2\), "
                                      r"got 'net\.7'"),
    ({"student_layer": 1}, MLP, r"student\.arch mlp takes a module name"),
], ids=["hf-index-too-high", "hf-index-too-low", "hf-module-name", "hf-attention-index", "mlp-unknown-module",
        "mlp-index"])
def test_student_layers_the_student_lacks(spec, student, expect):
    with pytest.raises(DistillError, match=expect) as e:
        check_student_layers([{**_hint(), **spec}], student, 6)
    assert "\n" not in str(e.value)


def test_shapes_that_do_not_meet_are_one_line():
    """RKD needs pooled features: a token-level teacher column is named with both shapes."""
    spec = {"kind": "rkd_distance", "teacher": "t", "teacher_layer": "2", "student_layer": 1}
    with pytest.raises(DistillError, match=r"train\.extra_losses\.0: rkd_distance cannot compare the student's hidden "
                                           r"state 1 \[6, 8\] with teacher 't' feature '2' \[6, 4\]") as e:
        resolve_terms([spec], [{"name": "t", "features": ["2"], "pool": "none"}], {"feat__t__2": [6, 4]}, BERT, 6)
    assert "\n" not in str(e.value)


def test_fsdp_is_accepted(tmp_path):
    """train.strategy fsdp: the projections stay outside FSDP, replicated (actors/fsdp_terms.py;
    tests/test_grad_clip_terms.py, tests/test_lm_features_pipeline.py)."""
    from orchestrator.config import config_from_dict
    from orchestrator.extra_terms import check_before_labeling
    from tests.helpers import save_state_teacher

    cfg = config_from_dict({
        "dataset": {"source": "sklearn:digits"},
        "teachers": [{"name": "t", "backend": "torch", "module": "tests.helpers:TinyMLP", "features": ["net.1"],
                      "path": str(save_state_teacher(tmp_path / "t.pt"))}],
        "train": {"strategy": "fsdp", "extra_losses": [{"kind": "rkd_distance", "teacher": "t", "teacher_layer": "net.1",
                                                        "student_layer": "net.1"}]}})
    check_before_labeling(cfg, 64)  # the default mlp student has net.1: no error
    cfg.train.extra_losses[0]["student_layer"] = "net.9"
    with pytest.raises(DistillError, match=r"train\.extra_losses\.0\.student_layer: student\.arch mlp takes a module name"):
        check_before_labeling(cfg, 64)  # still checked under fsdp
