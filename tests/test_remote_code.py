"""teachers[].trust_remote_code: a teacher whose architecture is code in its own dir (config.json's
auto_map, a model_type transformers does not ship), loaded without Ray. The same dirs on Serve and
through the CLI: tests/test_bad_input.py (refusals), tests/test_vllm_teacher.py (backend vllm)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from orchestrator.errors import DistillError
from orchestrator.models import CausalLMTeacher, ClassifierTeacher, load_teacher, needs_remote_code
from tests.helpers_lm import as_remote_code, corpus, make_lm, make_tokenizer


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    texts = corpus(4)
    tok = make_tokenizer(root / "tok", texts)
    plain = make_lm(root / "llama", tok, texts, hidden=32, layers=1, seed=7, steps=3)
    windows = np.array([t for doc in tok(texts)["input_ids"] for t in doc])[:64].reshape(2, 32)
    return plain, as_remote_code(plain, root / "custom"), windows


def test_trusted_teacher_runs_its_own_code_and_labels_as_the_same_weights(dirs):
    plain, custom, windows = dirs
    teacher = CausalLMTeacher({"name": "c", "backend": "hf", "path": str(custom), "trust_remote_code": True}, k=8)
    assert type(teacher.model).__name__ == "TinyCustomForCausalLM"  # the class in the dir's modeling_tiny.py
    assert type(teacher.model).__module__.endswith("modeling_tiny")
    ids, lps = teacher(windows)
    ref_ids, ref_lps = CausalLMTeacher({"name": "p", "backend": "hf", "path": str(plain)}, k=8)(windows)
    assert ids.shape == (2, 31, 8)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(lps, ref_lps, atol=1e-6)


def test_untrusted_code_is_refused_in_one_line_before_loading(dirs):
    _, custom, _ = dirs
    with pytest.raises(DistillError) as e:
        load_teacher({"name": "c", "backend": "hf", "path": str(custom)}, task="lm", k=8)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("teacher 'c': ") and "set trust_remote_code: true on this teacher" in msg


def test_auto_map_beside_a_model_type_transformers_ships_needs_no_trust():
    # as hub repos of architectures transformers took in later (Phi-3, ...): its own class is used
    assert not needs_remote_code({"model_type": "llama", "auto_map": {"AutoConfig": "x.Y"}})
    assert needs_remote_code({"model_type": "tiny_custom", "auto_map": {"AutoConfig": "x.Y"}})
    assert not needs_remote_code({"model_type": "tiny_custom"})


CLS_CODE = '''from transformers import AutoModel, LlamaConfig, LlamaForSequenceClassification, LlamaModel


class TinyClsConfig(LlamaConfig):
    model_type = "tiny_cls"


class TinyClsModel(LlamaModel):
    config_class = TinyClsConfig


# transformers' generic sequence-classification head builds its body with AutoModel.from_config
AutoModel.register(TinyClsConfig, TinyClsModel, exist_ok=True)


class TinyClsForSequenceClassification(LlamaForSequenceClassification):
    config_class = TinyClsConfig
'''


def test_trusted_classifier_teacher(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, num_labels=3, pad_token_id=0, max_position_embeddings=16)
    LlamaForSequenceClassification(cfg).save_pretrained(str(tmp_path / "plain"))
    shutil.copytree(tmp_path / "plain", tmp_path / "custom")
    conf = json.loads((tmp_path / "custom" / "config.json").read_text())
    conf.update(model_type="tiny_cls", architectures=["TinyClsForSequenceClassification"],
                auto_map={"AutoConfig": "cls_code.TinyClsConfig",
                          "AutoModelForSequenceClassification": "cls_code.TinyClsForSequenceClassification"})
    (tmp_path / "custom" / "config.json").write_text(json.dumps(conf))
    (tmp_path / "custom" / "cls_code.py").write_text(CLS_CODE)
    x = np.array([[1, 5, 7, 9], [3, 4, 2, 8]], dtype=np.float32)
    custom = ClassifierTeacher({"name": "c", "backend": "hf", "path": str(tmp_path / "custom"), "trust_remote_code": True})
    assert type(custom.model).__name__ == "TinyClsForSequenceClassification"
    np.testing.assert_allclose(custom(x), ClassifierTeacher({"name": "p", "backend": "hf", "path": str(tmp_path / "plain")})(x),
                               atol=1e-6)
    with pytest.raises(DistillError, match=r"^teacher 'c': .* set trust_remote_code: true on this teacher"):
        load_teacher({"name": "c", "backend": "hf", "path": str(tmp_path / "custom")})


def test_hf_teachers_of_a_bfloat16_checkpoint_run_in_float32_on_the_cpu(tmp_path):
    """Hub checkpoints are mostly saved in bfloat16, and transformers 5 loads a checkpoint in its own
    dtype unless told: on the CPU the hf teachers load in float32 (the documented behaviour, and the
    vLLM CPU teacher's default), so their labels match the same weights in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, num_labels=3, pad_token_id=0, max_position_embeddings=16)
    lm = LlamaForCausalLM(cfg).to(torch.bfloat16)
    lm.save_pretrained(str(tmp_path / "lm"))
    LlamaForSequenceClassification(cfg).to(torch.bfloat16).save_pretrained(str(tmp_path / "cls"))
    teacher = CausalLMTeacher({"name": "t", "backend": "hf", "path": str(tmp_path / "lm")}, k=4)
    assert teacher.model.dtype == torch.float32
    x = np.arange(1, 17).reshape(2, 8) % 40
    ids, lps = teacher(x)
    with torch.no_grad():  # the same bfloat16 weights, widened: what the labels must be
        ref = torch.log_softmax(lm.float()(input_ids=torch.from_numpy(x)).logits[:, :-1], -1).topk(4, dim=-1)
    np.testing.assert_array_equal(ids, ref.indices.numpy())
    np.testing.assert_allclose(lps, ref.values.numpy(), atol=1e-5)
    assert ClassifierTeacher({"name": "c", "backend": "hf", "path": str(tmp_path / "cls")}).model.dtype == torch.float32
