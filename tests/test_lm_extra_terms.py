"""train.extra_losses in the LM train step (orchestrator/lm_extra_terms.py): hand-computed hint and
relation terms at the labeled positions, the projections' state, and the checks that give one
error line before any deployment. No Ray; tests/test_lm_features_pipeline.py runs it on Ray Train."""
from __future__ import annotations

import pytest
import torch

from orchestrator.config import config_from_dict
from orchestrator.errors import DistillError
from orchestrator.feature_losses import HintLoss, RKDDistance
from orchestrator.lm_extra_terms import LMExtraTerms, check_lm_terms, resolve_lm_terms
from orchestrator.models import build_student
from tests.helpers_lm import lm_config, make_untrained_lm_setup

STUDENT = {"arch": "causal_lm", "init": "scratch",
           "config": {"model_type": "llama", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8,
                      "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                      "max_position_embeddings": 16}}


def _student():
    """Embeddings E[token] = (token, 0, 0, 0): hidden state 0 is hand-checkable."""
    torch.manual_seed(0)
    model = build_student(STUDENT)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.zero_()
        emb[:, 0] = torch.arange(8, dtype=emb.dtype)
    return model


def _resolved(kind: str, pool: str, weight: float = 0.5) -> list[dict]:
    spec = {"kind": kind, "weight": weight, "teacher": "t", "teacher_layer": 1, "student_layer": 0}
    shape = [-1, 4] if pool == "none" else [4]
    return [{"spec": spec, "student": {"kind": "hidden", "key": 0, "shape": [4]}, "label": kind,
             "parts": [{"teacher": "t", "column": "feat__t__1", "shape": shape, "pool": pool, "student_dim": 4,
                        "teacher_dim": 4}]}]


def _identity(terms):
    with torch.no_grad():
        for mod in terms.modules():
            if isinstance(mod, HintLoss):
                mod.proj.weight.copy_(torch.eye(4))
                mod.proj.bias.zero_()


def test_hint_per_token_at_the_labeled_positions_by_hand():
    """Labeled positions (0, 0) and (1, 1): student vectors (1, 0, 0, 0) and (5, 0, 0, 0), teacher's 0:
    mse per position 1/4 and 25/4, mean 3.25, x weight 0.5 = 1.625. The unlabeled positions' stored
    values (garbage here) never count."""
    model = _student()
    terms = LMExtraTerms(_resolved("hint", "none"), model)
    _identity(terms)
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    sel = torch.tensor([[True, False], [False, True]])
    t = torch.full((2, 2, 4), 1e3, dtype=torch.float16)
    t[sel] = 0
    logits, extra = terms.lm_step(model, x, {}, sel, {"feat__t__1": t})
    assert extra.item() == pytest.approx(1.625)
    torch.testing.assert_close(logits, model(input_ids=x).logits[:, :-1][sel])
    extra.backward()  # the projection trains: d/dW = 0.5 * 2/4 * mean_i diff_i s_i^T, diff_i = s_i here
    grad = terms.losses[0][0].loss.proj.weight.grad
    assert grad[0, 0].item() == pytest.approx(0.25 * (1 + 25) / 2) and grad[1:].abs().sum() == 0
    assert terms.pop_means() == {"hint": pytest.approx(1.625)}


def test_relation_term_over_rows_pooled_like_the_teacher():
    """pool mean: the student's hidden state averaged over each row's labeled positions (row 0:
    tokens 1, 2 -> 1.5; row 1: token 5; row 2: tokens 6, 7 -> 6.5), then RKD distance between rows."""
    model = _student()
    terms = LMExtraTerms(_resolved("rkd_distance", "mean", weight=2.0), model)
    x = torch.tensor([[1, 2, 3], [4, 5, 6], [6, 7, 1]])
    sel = torch.tensor([[True, True], [False, True], [True, True]])
    t = torch.tensor([[0.0, 1, 0, 0], [0, 3, 0, 0], [0, 0, 2, 0]], dtype=torch.float16)
    _, extra = terms.lm_step(model, x, {}, sel, {"feat__t__1": t})
    s = torch.tensor([[1.5, 0, 0, 0], [5, 0, 0, 0], [6.5, 0, 0, 0]])
    assert extra.item() == pytest.approx(2.0 * RKDDistance()(s, t.float()).item(), rel=1e-5)
    _, small = terms.lm_step(model, x[:1], {}, sel[:1], {"feat__t__1": t[:1]})  # one row: nothing to relate
    assert small.item() == 0.0


def test_projections_are_the_terms_only_state():
    model = _student()
    terms = LMExtraTerms(_resolved("hint", "none"), model)
    assert sorted(terms.state_dict()) == ["losses.0.0.loss.proj.bias", "losses.0.0.loss.proj.weight"]
    again = LMExtraTerms(_resolved("hint", "none"), model)
    again.load_state_dict(terms.state_dict())  # what a resumed worker does with the checkpoint's extra_terms
    assert torch.equal(again.losses[0][0].loss.proj.weight, terms.losses[0][0].loss.proj.weight)
    assert not any(k.startswith("losses") for k in model.state_dict())  # the student (what is exported) has none


# ---- the driver's checks ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    return make_untrained_lm_setup(tmp_path_factory.mktemp("lm"))


def _cfg(tmp_path, lm_files, pool: str, *terms: dict):
    raw = lm_config(tmp_path, lm_files)
    raw["teachers"][0].update(features=[1], pool=pool)  # 'small': 1 layer, hidden 32
    raw["train"]["extra_losses"] = list(terms)
    return config_from_dict(raw)


def _term(**kw):
    return {"kind": "hint", "teacher": "small", "teacher_layer": 1, "student_layer": 1, **kw}


def test_resolve_lm_terms_reads_widths_from_the_store_and_the_student(tmp_path, lm_files):
    cfg = _cfg(tmp_path, lm_files, "none", _term(distance="cosine"))
    check_lm_terms(cfg)
    (r,) = resolve_lm_terms(cfg, cfg.train.extra_losses, {"feat__small__1": [-1, 32]})
    assert r["student"] == {"kind": "hidden", "key": 1, "shape": [16]}
    assert r["parts"] == [{"teacher": "small", "column": "feat__small__1", "shape": [-1, 32], "pool": "none",
                           "student_dim": 16, "teacher_dim": 32}]
    assert r["label"] == "hint x1: small/1 -> student hidden state 1, projection 16->32"
    with pytest.raises(DistillError, match=r"train\.extra_losses\.0\.teacher_layer: the store has no column "
                                           r"feat__small__1; re-label"):
        resolve_lm_terms(cfg, cfg.train.extra_losses, {})


@pytest.mark.parametrize("pool, term, expect", [
    ("none", _term(kind="attention"), r"train\.extra_losses\.0\.kind: attention transfer is for task classification"),
    ("none", _term(kind="similarity"), r"train\.extra_losses\.0\.kind: similarity relates samples: task lm needs one "
                                       r"vector per sequence, but teacher 'small' has pool none"),
    ("mean", _term(student_layer=3), r"train\.extra_losses\.0\.student_layer: index 3 out of range: the student has 2 "
                                     r"hidden states \(0 = embeddings \.\. 1\)"),
    ("mean", _term(student_layer="model.norm"), r"train\.extra_losses\.0\.student_layer: task lm takes a hidden-state "
                                                r"index of the student"),
], ids=["attention", "relation-per-token", "student-layer-out-of-range", "student-layer-name"])
def test_check_lm_terms_refuses_in_one_line(tmp_path, lm_files, pool, term, expect):
    with pytest.raises(DistillError, match=expect):
        check_lm_terms(_cfg(tmp_path, lm_files, pool, term))


def test_relation_terms_take_pooled_features(tmp_path, lm_files):
    cfg = _cfg(tmp_path, lm_files, "mean", _term(kind="rkd_angle"))
    check_lm_terms(cfg)
    (r,) = resolve_lm_terms(cfg, cfg.train.extra_losses, {"feat__small__1": [32]})
    assert r["parts"][0]["pool"] == "mean" and r["label"] == "rkd_angle x1: small/1 -> student hidden state 1"


def test_fsdp_is_accepted(tmp_path, lm_files):
    """The projections stay outside FSDP, replicated, inside its grad_clip norm and checkpoints
    (actors/fsdp_terms.py; trained on Ray against DDP: tests/test_lm_features_pipeline.py)."""
    raw = lm_config(tmp_path, lm_files)
    raw["teachers"][0].update(features=[1], pool="none")
    raw["train"].update(strategy="fsdp", extra_losses=[_term()])
    check_lm_terms(config_from_dict(raw))
    raw["train"]["extra_losses"] = [_term(kind="rkd_angle")]  # still checked under fsdp
    with pytest.raises(DistillError, match=r"train\.extra_losses\.0\.kind: rkd_angle relates samples"):
        check_lm_terms(config_from_dict(raw))
