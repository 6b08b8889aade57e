"""Transformer students for classification (``student.arch: hf``): an HF
``AutoModelForSequenceClassification`` over token ids. Pure torch + transformers: no Ray.

A spec is plain data (it pickles into Ray workers), one of

  {"arch": "hf", "num_classes": C, "init": "scratch",    "config": {HF config dict with model_type}}
  {"arch": "hf", "num_classes": C, "init": "pretrained", "path": DIR}
  {"arch": "hf", "num_classes": C, "init": "teacher",    "path": TEACHER_DIR, "layers": [i, j, ...]}

``init: teacher`` keeps the sequence-classification teacher's embeddings, its layers i, j, ...
(in that order) and its head (BERT's pooler + classifier, DistilBERT's pre_classifier +
classifier, a Llama-family model's final norm + score), read tensor by tensor from its
safetensors files as orchestrator/students.py does for causal LMs (DistilBERT initialisation).

Inputs: token ids [B, L]. The classification store's ``features`` column holds them as float32,
as the hf teachers read them: the quickstart's pixel values 0..16 are token ids (no padding), or
``dataset.text`` tokenized with the ensemble's tokenizer and padded with its pad id, which
``spec["pad_token_id"]`` names so that padding is masked out of attention (as the teachers do).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import DistillError
from .students import _check_init, _load_kept_layers, _read_config, check_layers, kept_config, lm_student_config

# The sequence classifiers init: teacher knows, by model_type: where their layer list lives.
LAYER_PREFIX = {"bert": "bert.encoder.layer.", "roberta": "roberta.encoder.layer.",
                "distilbert": "distilbert.transformer.layer.", "llama": "model.layers.", "mistral": "model.layers.",
                "qwen2": "model.layers.", "qwen3": "model.layers."}
# Decoders classify from the last non-padding token: they need to know which id pads.
DECODERS = ("llama", "mistral", "qwen2", "qwen3")
# The config field a user fixes when the student's config is wrong, by init.
FIELD = {"scratch": "student.config", "pretrained": "student.path", "teacher": "student.teacher"}


def _teacher_config(spec: dict):
    tcfg = _read_config(spec["path"], "student.teacher")
    if tcfg.model_type not in LAYER_PREFIX:
        arch = ", ".join(getattr(tcfg, "architectures", None) or []) or tcfg.model_type
        raise DistillError(f"student.teacher: {spec['path']} is a {arch} (model_type {tcfg.model_type}); student.arch hf "
                           f"with init: teacher supports model_type {', '.join(LAYER_PREFIX)}; use init: pretrained or scratch")
    return tcfg


def cls_student_config(spec: dict):
    """The HF config of the student ``spec`` builds, without loading weights, checked: its
    num_labels is the ensemble's class count (spec["num_classes"], when given), and a decoder
    knows its padding id."""
    init = _check_init(spec)
    if init == "scratch":
        config = lm_student_config(spec)  # AutoConfig.for_model(model_type, ...): any architecture
    elif init == "pretrained":
        config = _read_config(spec["path"], "student.path")
    else:
        tcfg = _teacher_config(spec)
        config = kept_config(tcfg, check_layers(spec.get("layers"), tcfg.num_hidden_layers))
    field, classes = FIELD[init], spec.get("num_classes")  # None: not known yet (prepare, before labeling)
    if classes is not None and config.num_labels != classes:
        raise DistillError(f"{field}: the student has num_labels {config.num_labels}, the teachers' ensemble "
                           f"{classes} classes; set num_labels: {classes} in its config.json")
    if config.model_type in DECODERS and getattr(config, "pad_token_id", None) is None:
        raise DistillError(f"{field}: a {config.model_type} sequence classifier reads the last non-padding token and "
                           f"needs pad_token_id in its config.json; set one")
    return config


def build_cls_student(spec: dict):
    """spec (see the module docstring) -> an AutoModelForSequenceClassification in train mode."""
    from transformers import AutoModelForSequenceClassification

    config, init = cls_student_config(spec), spec["init"]
    if init == "pretrained":
        try:
            model = AutoModelForSequenceClassification.from_pretrained(str(spec["path"]), local_files_only=True,
                                                                       dtype=torch.float32)
        except Exception as e:
            raise DistillError(f"student.path: cannot load a sequence classifier from {spec['path']}: "
                               f"{type(e).__name__}: {e}") from None
        return model.train()
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    if init == "teacher":
        keep = check_layers(spec["layers"], _read_config(spec["path"], "student.teacher").num_hidden_layers)
        _load_kept_layers(model, Path(spec["path"]), keep, tied=False, prefix=LAYER_PREFIX[config.model_type])
    return model.train()


def cls_logits(model, ids: torch.Tensor, pad_id: int | None = None) -> torch.Tensor:
    """ids [B, L] (any numeric dtype holding token ids) -> logits [B, C]. pad_id: the id that pads
    text rows (dataset.text; masked out of attention), or None: every position is a token."""
    ids = ids.round().long() if ids.is_floating_point() else ids.long()
    mask = torch.ones_like(ids) if pad_id is None else (ids != pad_id).long()
    return model(input_ids=ids, attention_mask=mask).logits


def check_token_inputs(config, x: np.ndarray, field: str = "dataset.features") -> None:
    """The rows [N, L] must be token ids the student can embed, in sequences it can position."""
    vocab, width = config.vocab_size, x.shape[1]
    if not np.array_equal(x, np.round(x)) or x.min() < 0 or x.max() >= vocab:
        raise DistillError(f"{field}: student.arch hf reads the features as token ids, integers in [0, {vocab}) "
                           f"(its vocab_size); found values in [{x.min():g}, {x.max():g}]")
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and width > limit:
        raise DistillError(f"{field}: rows of {width} tokens are longer than the student takes "
                           f"(max_position_embeddings {limit}); use a student config with more positions")


def cls_from_state(spec: dict, state: dict):
    """A trained student rebuilt from its state dict (architecture from the spec alone), in eval mode."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(cls_student_config(spec), dtype=torch.float32)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise DistillError(f"export: the checkpoint does not fit the student spec ({str(e).splitlines()[0]})") from None
    return model.eval()


def export_cls_student(model_or_state, spec: dict, out_dir, tokenizer_dir=None, dtype: str = "float32") -> Path:
    """A trained student as a from_pretrained directory (config.json, model.safetensors in ``dtype``
    and, when the ensemble has one, the tokenizer), loadable by AutoModelForSequenceClassification.
    The directory appears complete or not at all (written beside it, then renamed)."""
    out = Path(out_dir)
    model = cls_from_state(spec, model_or_state) if isinstance(model_or_state, dict) else model_or_state
    tok = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        except Exception as e:
            raise DistillError(f"student.tokenizer: cannot load a tokenizer from {tokenizer_dir}: "
                               f"{type(e).__name__}: {e}") from None
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(getattr(torch, dtype)).save_pretrained(str(tmp))
    if tok is not None:
        tok.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
