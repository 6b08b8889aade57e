"""student.arch hf: transformer sequence-classifier students (orchestrator/cls_students.py).

Teachers are tiny BERT / DistilBERT / Llama sequence classifiers built from configs with random
weights and saved with save_pretrained, so every unit check runs in seconds without a hub. The
pipeline test (slow, real Ray) distils into a student kept from a BERT teacher's layers and
reloads the exported dir.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from orchestrator.cls_students import (build_cls_student, check_token_inputs, cls_from_state, cls_logits,
                                       cls_student_config, export_cls_student)
from orchestrator.config import config_from_dict
from orchestrator.errors import DistillError
from orchestrator.models import build_student

VOCAB, CLASSES = 32, 10
TINY = {
    "bert": {"model_type": "bert", "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 3,
             "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 1,
             "num_labels": CLASSES},
    "distilbert": {"model_type": "distilbert", "vocab_size": VOCAB, "dim": 32, "n_layers": 3, "n_heads": 4,
                   "hidden_dim": 64, "max_position_embeddings": 64, "num_labels": CLASSES},
    "llama": {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "pad_token_id": 0, "num_labels": CLASSES},
}
# Where each family keeps its layer list, and the tensors outside it that a student keeps.
LAYERS = {"bert": "bert.encoder.layer.", "distilbert": "distilbert.transformer.layer.", "llama": "model.layers."}


def save_teacher(root, cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = build_cls_student({"arch": "hf", "init": "scratch", "config": cfg, "num_classes": cfg["num_labels"]}).eval()
    with torch.no_grad():  # norms start at exactly 1 / 0: make them distinct, so a wrong copy shows
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.add_(0.1 * torch.randn_like(p))
    path = root / cfg["model_type"]
    model.save_pretrained(str(path))
    return path, model


@pytest.fixture(params=list(TINY))
def teacher(request, tmp_path):
    return save_teacher(tmp_path, TINY[request.param])


def ids(n=4, length=16, seed=0):
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def test_scratch_builds_a_sequence_classifier_of_the_config():
    m = build_student({"arch": "hf", "init": "scratch", "config": TINY["bert"], "num_classes": CLASSES})
    assert type(m).__name__ == "BertForSequenceClassification" and m.training
    assert m.config.num_hidden_layers == 3 and m.config.hidden_size == 32
    assert cls_logits(m, ids().float()).shape == (4, CLASSES)


def test_pretrained_loads_the_dirs_weights(teacher):
    path, t = teacher
    s = build_student({"arch": "hf", "init": "pretrained", "path": str(path), "num_classes": CLASSES}).eval()
    ts, ss = t.state_dict(), s.state_dict()
    assert set(ts) == set(ss) and all(torch.equal(ss[k], ts[k]) for k in ts)
    x = ids()
    assert torch.allclose(cls_logits(s, x), cls_logits(t, x))


def test_kept_layers_are_the_teachers(teacher):
    path, t = teacher
    kind = t.config.model_type
    s = build_student({"arch": "hf", "init": "teacher", "path": str(path), "layers": [0, 2],
                       "num_classes": CLASSES}).eval()
    assert s.config.num_hidden_layers == 2 and type(s) is type(t)
    ts, ss, prefix = t.state_dict(), s.state_dict(), LAYERS[kind]
    for j, i in enumerate([0, 2]):
        layer = {k[len(f"{prefix}{i}."):]: v for k, v in ts.items() if k.startswith(f"{prefix}{i}.")}
        assert layer and all(torch.equal(ss[f"{prefix}{j}.{k}"], v) for k, v in layer.items())
    rest = [k for k in ts if not k.startswith(prefix)]  # embeddings, final norm / pooler, head
    assert rest and all(torch.equal(ss[k], ts[k]) for k in rest)
    assert not any(k.startswith(f"{prefix}2.") for k in ss)  # nothing of a third layer


def test_all_layers_kept_is_the_teacher(teacher):
    path, t = teacher
    s = build_student({"arch": "hf", "init": "teacher", "path": str(path), "layers": [0, 1, 2],
                       "num_classes": CLASSES}).eval()
    x = ids(seed=1)
    assert torch.allclose(cls_logits(s, x), cls_logits(t, x), atol=1e-6)


def test_padding_is_masked():
    """A padded row's logits equal the unpadded row's: the mask keeps padding out of attention."""
    m = build_student({"arch": "hf", "init": "scratch", "config": TINY["bert"], "num_classes": CLASSES}).eval()
    x = ids(n=1, length=8)
    padded = torch.cat([x, torch.zeros(1, 4, dtype=x.dtype)], 1)
    with torch.no_grad():
        assert torch.allclose(cls_logits(m, x), cls_logits(m, padded, pad_id=0), atol=1e-5)
        assert not torch.allclose(cls_logits(m, x), cls_logits(m, padded), atol=1e-5)


@pytest.mark.parametrize("family", list(TINY))
def test_gradient_checkpointing_gives_the_same_gradients(family):
    """train.gradient_checkpointing on a classifier student: the same gradients (dropout off, so that the
    two calls draw no different masks)."""
    cfg = {**TINY[family], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "dropout": 0.0,
           "attention_dropout": 0.0, "seq_classif_dropout": 0.0}
    m = build_student({"arch": "hf", "init": "scratch", "config": cfg, "num_classes": CLASSES})
    x, y = ids(), torch.arange(4) % CLASSES

    def grads():
        m.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(cls_logits(m, x, pad_id=0), y).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    want = grads()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert m.is_gradient_checkpointing
    got = grads()
    assert got.keys() == want.keys() and len(want) > 10
    for n, g in want.items():
        assert torch.allclose(got[n], g, rtol=1e-5, atol=1e-7), n


def test_export_reloads_with_auto_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    spec = {"arch": "hf", "init": "scratch", "config": TINY["distilbert"], "num_classes": CLASSES}
    torch.manual_seed(0)
    m = build_cls_student(spec).eval()
    out = export_cls_student(m.state_dict(), spec, tmp_path / "student")
    assert not (tmp_path / "student.tmp").exists()
    back = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True).eval()
    x = ids()
    assert torch.equal(cls_logits(back, x), cls_logits(cls_from_state(spec, m.state_dict()), x))
    half = export_cls_student(m.state_dict(), spec, tmp_path / "bf16", dtype="bfloat16")  # student.export_dtype
    back = AutoModelForSequenceClassification.from_pretrained(str(half), local_files_only=True)
    assert back.dtype == torch.bfloat16 and torch.equal(back.classifier.weight, m.classifier.weight.bfloat16())


@pytest.mark.parametrize("spec, expect", [
    ({"init": "scratch", "config": {**TINY["bert"], "num_labels": 3}},
     r"student\.config: the student has num_labels 3, the teachers' ensemble 10 classes; set num_labels: 10"),
    ({"init": "scratch", "config": {k: v for k, v in TINY["llama"].items() if k != "pad_token_id"}},
     r"student\.config: a llama sequence classifier .* needs pad_token_id"),
    ({"init": "teacher", "layers": [0, 3]}, r"student\.layers: \[3\] out of range; the teacher has 3 layers"),
], ids=["num-labels-mismatch", "decoder-without-pad", "layer-out-of-range"])
def test_bad_students_are_one_line_errors(tmp_path, spec, expect):
    path, _ = save_teacher(tmp_path, TINY["bert"])
    spec = {"arch": "hf", "num_classes": CLASSES, **spec, **({"path": str(path)} if spec["init"] == "teacher" else {})}
    with pytest.raises(DistillError, match=expect) as e:
        build_cls_student(spec)
    assert "\n" not in str(e.value)


def test_teacher_of_another_architecture_is_named(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    GPT2ForSequenceClassification(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, num_labels=CLASSES,
                                             pad_token_id=0)).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(DistillError, match=r"student\.teacher: .* is a GPT2ForSequenceClassification \(model_type gpt2\)"):
        cls_student_config({"init": "teacher", "path": str(tmp_path / "gpt2"), "layers": [0], "num_classes": CLASSES})


def test_token_inputs_must_fit_the_student():
    config = cls_student_config({"init": "scratch", "config": TINY["bert"], "num_classes": CLASSES})
    check_token_inputs(config, np.full((2, 64), VOCAB - 1, np.float32))  # fits: no error
    with pytest.raises(DistillError, match=r"dataset\.features: .* integers in \[0, 32\) .*found values in \[0, 32\]"):
        check_token_inputs(config, np.array([[0, 32]], np.float32))
    with pytest.raises(DistillError, match=r"dataset\.features: .*found values in \[0, 1\.5\]"):
        check_token_inputs(config, np.array([[0, 1.5]], np.float32))
    with pytest.raises(DistillError, match=r"dataset\.features: rows of 65 tokens .* \(max_position_embeddings 64\)"):
        check_token_inputs(config, np.zeros((1, 65), np.float32))


def _cfg(student: dict, backend: str = "hf") -> dict:
    return {"dataset": {"source": "sklearn:digits"}, "student": student,
            "teachers": [{"name": "bert", "backend": backend, "path": "t"}]}


@pytest.mark.parametrize("student, expect", [
    ({"arch": "hf"}, r"student\.config: required for student\.arch hf with student\.init scratch"),
    ({"arch": "hf", "config": "c.json", "hidden": [8]},
     r"student\.hidden: not used by task classification with student\.arch hf; remove it, or set student\.arch: mlp"),
    ({"config": "c.json"},
     r"student\.config: not used by task classification with student\.arch mlp; remove it, or set student\.arch: hf"),
    ({"arch": "hf", "init": "teacher", "teacher": "nope", "layers": [0]}, r"student\.teacher: no teacher named 'nope'"),
    ({"arch": "hf", "init": "pretrained", "config": "c.json", "path": "p"},
     r"student\.config: not used with student\.init pretrained"),
    ({"arch": "transformer"}, r"student\.arch: Input should be 'mlp' or 'hf'"),
], ids=["scratch-without-config", "hidden-with-hf", "config-with-mlp", "unknown-teacher", "config-with-pretrained",
        "unknown-arch"])
def test_config_errors(student, expect):
    with pytest.raises(DistillError, match=expect) as e:
        config_from_dict(_cfg(student))
    assert "\n" not in str(e.value)


def test_init_teacher_needs_an_hf_teacher():
    with pytest.raises(DistillError, match=r"student\.teacher: 'bert' is a torch teacher"):
        config_from_dict(_cfg({"arch": "hf", "init": "teacher", "teacher": "bert", "layers": [0]}, backend="torch"))


def test_default_is_the_mlp():
    cfg = config_from_dict(_cfg({}))
    assert cfg.student.arch == "mlp" and cfg.student.hidden == [32]


# ---- the pipeline, end to end ---------------------------------------------------------------


@pytest.mark.slow
def test_pipeline_with_a_student_kept_from_a_bert_teacher(ray_local, teachers, tmp_path):
    """Label with a torch and a BERT teacher (pixel values as token ids), distil into a student
    made of the BERT teacher's embeddings, layer 1 and head for a few steps, on 2 DDP workers;
    the exported dir reloads with AutoModelForSequenceClassification and scores the report's accuracy."""
    from transformers import AutoModelForSequenceClassification

    from orchestrator.datasets import features_of
    from orchestrator.pipeline import prepare, run
    from orchestrator.training import export_checkpoint
    from tests.helpers import tiny_config

    bert = {**TINY["bert"], "vocab_size": 17, "num_hidden_layers": 2}  # digits' pixels are 0..16
    path, _ = save_teacher(tmp_path, bert)
    cfg = tiny_config(tmp_path, {"linear": teachers["linear"]}, dataset={"limit": 300},
                      student={"arch": "hf", "init": "teacher", "teacher": "bert", "layers": [1]},
                      # no hard-label baseline: its export is the same code, and another Ray Train run
                      train={"epochs": 1, "max_steps": 3, "batch_size": 32}, eval={"baseline": False})
    del cfg["student"]["hidden"]
    cfg["teachers"].append({"name": "bert", "backend": "hf", "path": str(path), "num_cpus": 0.25})
    cfg = config_from_dict(cfg)
    out = run(cfg, quiet=True)
    report = json.loads(open(out["report"]).read())  # report.json
    test = prepare(cfg).test
    x, y = torch.from_numpy(features_of(test)), test.column("label").to_numpy()
    d = cfg.run_dir / "students" / "student"
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(str(d), local_files_only=True).eval()
    assert model.config.num_hidden_layers == 1
    with torch.no_grad():
        acc = float((cls_logits(model, x).argmax(1).numpy() == y).mean())
    assert acc == report["models"]["student"]["accuracy"]
    # `distill export` of the final state writes the same model again
    again = export_checkpoint(cfg, prepare(cfg), name="student", out=str(tmp_path / "again"))
    a = AutoModelForSequenceClassification.from_pretrained(str(again), local_files_only=True).state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(str(cfg.run_dir / "students" / "student"),
                                                           local_files_only=True).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- text inputs: dataset.text tokenized with the ensemble's tokenizer ---------------------------

WORDS = ["red apple", "green pear and a long yellow banana", "blue sky", "the dark night sky and stars"]


@pytest.fixture
def text_setup(tmp_path):
    """A text dataset (label: row % 2), a BPE tokenizer with a pad token, and a tiny BERT teacher
    that ships that tokenizer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.helpers_lm import make_tokenizer

    texts = [WORDS[i % 4] + f" {i}" for i in range(40)]
    pq.write_table(pa.table({"body": texts, "label": [i % 2 for i in range(40)]}), tmp_path / "text.parquet")
    tok = make_tokenizer(tmp_path / "bert", texts, vocab=300)
    path, model = save_teacher(tmp_path, {**TINY["bert"], "vocab_size": len(tok), "num_labels": 2})
    return tmp_path, tok, path, model, texts


def _text_cfg(tmp, path, **student) -> dict:
    return {"output_dir": str(tmp / "runs"), "dataset": {"source": str(tmp / "text.parquet"), "text": "body"},
            "teachers": [{"name": "bert", "backend": "hf", "path": str(path)}],
            "student": {"arch": "hf", "init": "teacher", "teacher": "bert", "layers": [0], **student}}


def test_text_rows_are_padded_token_ids(text_setup):
    from orchestrator.datasets import features_of
    from orchestrator.prepare import prepare

    tmp, tok, path, _, texts = text_setup
    prep = prepare(config_from_dict(_text_cfg(tmp, path)))
    x = np.concatenate([features_of(prep.train), features_of(prep.test)])
    assert prep.train.num_rows + prep.test.num_rows == 40
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    assert x.shape[1] == max(lengths)  # padded to the longest row, none cut (64 positions)
    # every row: its text's ids, then pad ids to the width
    got = {tuple(r[r != tok.pad_token_id].astype(int)) for r in x}
    assert got == {tuple(tok(t)["input_ids"]) for t in texts}
    assert (x == tok.pad_token_id).sum() == sum(x.shape[1] - n for n in lengths)


def test_teacher_with_a_tokenizer_masks_its_padding(text_setup):
    from orchestrator.models import ClassifierTeacher

    _, tok, path, model, _ = text_setup
    teacher = ClassifierTeacher({"name": "bert", "backend": "hf", "path": str(path)})
    assert teacher.pad_id == tok.pad_token_id
    ids = tok(["red apple 3"])["input_ids"][0]
    padded = np.array([ids + [tok.pad_token_id] * 5], np.float32)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([ids])).logits.numpy()
    assert np.allclose(teacher(padded), alone, atol=1e-5)  # the pads changed nothing


def test_text_needs_a_tokenizer_shared_by_the_hf_teachers(text_setup):
    from orchestrator.prepare import prepare

    tmp, _, path, _, _ = text_setup
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / f).unlink(missing_ok=True)
    with pytest.raises(DistillError, match=r"student\.tokenizer: dataset\.text needs a tokenizer"):
        prepare(config_from_dict(_text_cfg(tmp, path)))
    other = tmp / "other"
    from tests.helpers_lm import make_tokenizer

    make_tokenizer(other, ["something else entirely"], vocab=280)
    with pytest.raises(DistillError, match=r"teacher 'bert': dataset\.text is tokenized with .*other"):
        prepare(config_from_dict(_text_cfg(tmp, path, tokenizer=str(other))))


def test_text_tokenizer_resaved_in_other_bytes_is_the_same_tokenizer(text_setup, caplog):
    """student.tokenizer a re-saved copy of the teacher's tokenizer (reformatted tokenizer.json, as
    a fine-tuning script saves it): the same ids and pad id, so accepted with a log line, and the
    rows are the teacher tokenizer's; the copy with another pad token is refused (the teacher
    would read the texts' padding as tokens)."""
    import shutil

    from orchestrator.datasets import features_of
    from orchestrator.prepare import prepare

    tmp, tok, path, _, texts = text_setup
    copy = tmp / "resaved"
    copy.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (path / f).is_file():
            shutil.copy(path / f, copy / f)
    raw = json.loads((copy / "tokenizer.json").read_text())
    (copy / "tokenizer.json").write_text(json.dumps(raw, indent=4, sort_keys=True))
    with caplog.at_level("INFO", logger="distill"):
        prep = prepare(config_from_dict(_text_cfg(tmp, path, tokenizer=str(copy))))
    assert "differ, but map every id to the same token and pad with id" in caplog.text
    x = features_of(prep.train)
    assert {tuple(r[r != tok.pad_token_id].astype(int)) for r in x} <= {tuple(tok(t)["input_ids"]) for t in texts}
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": config["eos_token"]}))
    for f in ("special_tokens_map.json",):
        (copy / f).unlink(missing_ok=True)
    with pytest.raises(DistillError, match=r"teacher 'bert': dataset\.text is tokenized with .*resaved"):
        prepare(config_from_dict(_text_cfg(tmp, path, tokenizer=str(copy))))


def test_text_and_features_together_are_refused(text_setup):
    tmp, _, path, _, _ = text_setup
    cfg = _text_cfg(tmp, path)
    cfg["dataset"]["features"] = "pixels"
    with pytest.raises(DistillError, match=r"dataset\.features: give dataset\.text .* or dataset\.features .*not both"):
        config_from_dict(cfg)


@pytest.mark.slow
def test_pipeline_on_text_exports_a_self_contained_classifier(ray_local, text_setup):
    """dataset.text end to end: labeled by the BERT teacher, a student of its layer 0 trained a few
    steps; the exported dir's own tokenizer + model score the held-out texts as the report does."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from orchestrator.datasets import features_of, split_indices
    from orchestrator.pipeline import prepare, run

    tmp, _, path, _, texts = text_setup
    cfg = _text_cfg(tmp, path)
    cfg.update(run={"name": "text"}, eval={"baseline": False}, store={"shard_size": 16},
               train={"workers": 2, "cpus_per_worker": 0.5, "epochs": 1, "max_steps": 3, "batch_size": 8})
    cfg["teachers"][0]["num_cpus"] = 0.25
    cfg = config_from_dict(cfg)
    report = json.loads(open(run(cfg, quiet=True)["report"]).read())
    d = cfg.run_dir / "students" / "student"
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)  # exported with the student
    model = AutoModelForSequenceClassification.from_pretrained(str(d), local_files_only=True).eval()
    _, test_idx = split_indices(len(texts), 0.3, 0)
    width = features_of(prepare(cfg).test).shape[1]
    enc = tok([texts[i] for i in test_idx], padding="max_length", max_length=width, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(1).numpy()
    acc = float((pred == np.array([i % 2 for i in test_idx])).mean())
    assert acc == report["models"]["student"]["accuracy"]
