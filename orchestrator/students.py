"""Causal-LM students: where their weights come from, and their export. Pure torch + transformers: no Ray.

A student spec is plain data (it pickles into Ray workers), one of

  {"init": "scratch",    "config": {HF config dict with model_type}}   random weights
  {"init": "pretrained", "path": DIR}                                  any local from_pretrained causal LM
  {"init": "teacher",    "path": DIR, "layers": [i, j, ...]}           the teacher's embeddings, decoder layers
                                                                       i, j, ... in that order, final norm and
                                                                       LM head (DistilBERT / Minitron style)

each with an optional "dtype" (default "float32": students train in float32, under autocast).

``init: teacher`` reads only the tensors the student keeps, one at a time, straight from the
teacher's safetensors files: the full teacher is never in memory, and nothing of the dropped
layers is kept. The student itself is built from a config (the teacher's, with the kept layers'
count and per-layer attention types), so every per-layer attribute (``layer_idx`` of each
attention module, which indexes the KV cache; sliding-window settings) is consistent by
construction rather than patched.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .errors import DistillError

# The layout init: teacher knows: model.model.embed_tokens / .layers / .norm and lm_head, and
# checkpoint keys model.layers.N.* (transformers' Llama family and the decoders built like it).
# Each is checked by tests/test_students.py: all layers kept give the teacher's logits.
TEACHER_INIT_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
                      "granite", "smollm3")
# Config lists with one entry per decoder layer: they travel with the kept layers.
PER_LAYER = ("layer_types", "no_rope_layers")
INITS = ("scratch", "pretrained", "teacher")


def _dtype(spec: dict) -> torch.dtype:
    name = spec.get("dtype", "float32")
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DistillError(f"student.dtype: unknown floating dtype '{name}' (use float32, bfloat16 or float16)")
    return dtype


def _read_config(path, field: str):
    from transformers import AutoConfig

    from .models import student_source_problem

    if not (Path(path) / "config.json").is_file():
        raise DistillError(f"{field}: {path} is not a from_pretrained directory (no config.json)")
    try:
        if problem := student_source_problem(json.loads((Path(path) / "config.json").read_text())):
            raise DistillError(f"{field}: {path} is {problem}")
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except DistillError:
        raise
    except Exception as e:
        raise DistillError(f"{field}: cannot read the config in {path}: {type(e).__name__}: {e}") from None


def _check_init(spec: dict) -> str:
    init = spec.get("init")
    if init not in INITS:
        raise DistillError(f"student.init: unknown '{init}' (allowed: {', '.join(INITS)})")
    need = {"scratch": "config", "pretrained": "path", "teacher": "path"}[init]
    if not spec.get(need):
        raise DistillError(f"student.{need}: required with init: {init}")
    return init


def check_layers(layers, num_layers: int) -> list[int]:
    """The kept teacher layer indices, validated: non-empty, distinct ints in [0, num_layers)."""
    if not isinstance(layers, (list, tuple)) or not layers:
        raise DistillError(f"student.layers: give a non-empty list of the teacher's layer indices "
                           f"(0..{num_layers - 1}), got {layers!r}")
    bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers]
    if bad:
        raise DistillError(f"student.layers: {bad} out of range; the teacher has {num_layers} layers (0..{num_layers - 1})")
    repeated = sorted({i for i in layers if list(layers).count(i) > 1})
    if repeated:
        raise DistillError(f"student.layers: {repeated} repeated; each teacher layer may be kept once")
    return list(layers)


def _teacher_student_config(spec: dict):
    """The teacher's config with only the kept layers: (student config, teacher config, kept indices)."""
    tcfg = _read_config(spec["path"], "student.path")
    if tcfg.model_type not in TEACHER_INIT_TYPES:
        arch = ", ".join(getattr(tcfg, "architectures", None) or []) or tcfg.model_type
        raise DistillError(f"student.init: teacher: {spec['path']} is a {arch} (model_type {tcfg.model_type}); "
                           f"init: teacher supports model_type {', '.join(TEACHER_INIT_TYPES)} "
                           f"(decoder layers saved as model.layers.N); use init: pretrained or scratch")
    keep = check_layers(spec.get("layers"), tcfg.num_hidden_layers)
    return kept_config(tcfg, keep), tcfg, keep


def kept_config(tcfg, keep: list[int]):
    """A copy of the teacher's config with only the layers ``keep`` (their per-layer settings too)."""
    scfg = tcfg.__class__.from_dict(tcfg.to_dict())  # a copy
    scfg.num_hidden_layers = len(keep)
    for name in PER_LAYER:  # per-layer full / sliding attention, RoPE on or off: travels with each kept layer
        if (per_layer := getattr(tcfg, name, None)) is not None:
            setattr(scfg, name, [per_layer[i] for i in keep])
    if getattr(tcfg, "max_window_layers", None) is not None:  # Qwen2/3: layers below it use full attention
        scfg.max_window_layers = sum(1 for i in keep if i < tcfg.max_window_layers)
    return scfg


def lm_student_config(spec: dict):
    """The HF config of the student ``spec`` builds, without loading any weights
    (for rebuilding a trained student from its state dict: evaluation, export)."""
    config = _own_config(spec)
    if spec.get("vocab_size") is not None:  # resized to the ensemble's vocabulary (check_student_vocab)
        config.vocab_size = int(spec["vocab_size"])
    return config


def _own_config(spec: dict):
    """The config of the student's source, before any resize to the ensemble's vocabulary."""
    init = _check_init(spec)
    if init == "scratch":
        from transformers import AutoConfig

        cfg = dict(spec["config"])
        try:
            return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        except (KeyError, ValueError) as e:
            raise DistillError(f"student.config: not a usable HF config ({type(e).__name__}: {e})") from None
    if init == "pretrained":
        return _read_config(spec["path"], "student.path")
    return _teacher_student_config(spec)[0]


def build_lm_student(spec: dict):
    """spec (see the module docstring) -> a PreTrainedModel (a causal LM) in train mode."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    init, dtype = _check_init(spec), _dtype(spec)
    if init == "scratch":
        model = AutoModelForCausalLM.from_config(lm_student_config(spec), dtype=dtype)
    elif init == "pretrained":
        _read_config(spec["path"], "student.path")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(spec["path"]), local_files_only=True, dtype=dtype)
        except Exception as e:
            raise DistillError(f"student.path: cannot load a causal LM from {spec['path']}: "
                               f"{type(e).__name__}: {e}") from None
    else:
        scfg, tcfg, keep = _teacher_student_config(spec)
        model = AutoModelForCausalLM.from_config(scfg, dtype=dtype)
        _load_kept_layers(model, Path(spec["path"]), keep, bool(getattr(tcfg, "tie_word_embeddings", False)))
        try:  # sampling defaults, eos ids: the teacher's
            model.generation_config = GenerationConfig.from_pretrained(str(spec["path"]), local_files_only=True)
        except OSError:
            pass
    if spec.get("vocab_size") is not None and int(spec["vocab_size"]) != model.config.vocab_size:
        from .vocab import resize_vocab

        resize_vocab(model, int(spec["vocab_size"]))
    return model.train()


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise DistillError(f"student.path: init: teacher reads safetensors weights, and {path} has none "
                       f"(model.safetensors or its index); re-save the teacher with save_pretrained")


def _load_kept_layers(model, path: Path, keep: list[int], tied: bool, prefix: str = "model.layers.") -> None:
    """Copy the teacher's tensors the student keeps into ``model``, one tensor at a time.

    Teacher key {prefix}{keep[j]}.X -> student key {prefix}{j}.X; every other key
    (embeddings, final norm, lm_head) keeps its name. A tied lm_head is absent from the file
    and stays tied to the embeddings it shares a Parameter with. ``prefix`` names the layer
    list: model.layers. (Llama family), bert.encoder.layer. and the like for sequence
    classifiers (orchestrator/cls_students.py).
    """
    from safetensors import safe_open

    new_index = {old: new for new, old in enumerate(keep)}
    target = model.state_dict()
    loaded = set()
    for f in _safetensors_files(path):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                name = key
                if key.startswith(prefix):
                    old, rest = key[len(prefix):].split(".", 1)
                    if int(old) not in new_index:
                        continue  # a dropped layer: never read
                    name = f"{prefix}{new_index[int(old)]}.{rest}"
                if name not in target:
                    raise DistillError(f"student.path: unexpected tensor {key} in {f}; is this a "
                                       f"{model.config.model_type} checkpoint saved by transformers?")
                tensor = fh.get_tensor(key)
                if tensor.shape != target[name].shape:
                    raise DistillError(f"student.path: tensor {key} in {f} has shape {tuple(tensor.shape)}, "
                                       f"the config says {tuple(target[name].shape)}")
                with torch.no_grad():
                    target[name].copy_(tensor)
                loaded.add(name)
    missing = set(target) - loaded - ({"lm_head.weight"} if tied else set())
    if missing:
        raise DistillError(f"student.path: {path} lacks {len(missing)} tensors the student needs "
                           f"(e.g. {sorted(missing)[0]})")
    if tied:
        model.tie_weights()


def student_vocab_size(spec: dict) -> int | None:
    return getattr(lm_student_config(spec), "vocab_size", None)


def check_student_vocab(spec: dict, vocab_size: int, tokens: int | None = None, field: str | None = None) -> dict:
    """The spec to build the student from, predicting over the ensemble's ``vocab_size`` ids; a one-line
    DistillError naming ``field`` if it cannot. A student whose own vocab_size differs only in padding
    rows (it holds the tokenizer's ``tokens`` ids) is resized to the ensemble's at build."""
    init = _check_init(spec)
    field = field or {"scratch": "student.config", "pretrained": "student.path", "teacher": "student.path"}[init]
    spec = {k: v for k, v in spec.items() if k != "vocab_size"}
    ours = getattr(_own_config(spec), "vocab_size", None)
    if ours == vocab_size:
        return spec
    if tokens is None or not isinstance(ours, int):
        raise DistillError(f"{field}: the student's vocab_size {ours} differs from the teachers' {vocab_size}; "
                           f"the student must predict over the teachers' vocabulary")
    if ours < tokens:
        raise DistillError(f"{field}: the student's vocab_size {ours} is smaller than the tokenizer's {tokens} tokens; "
                           f"the student must predict over the teachers' vocabulary")
    return {**spec, "vocab_size": vocab_size}


# ---- export ----------------------------------------------------------------------------------


def from_state(spec: dict, state: dict):
    """A trained student rebuilt from its state dict: the architecture from ``lm_student_config``
    alone (a teacher-initialised student does not read the teacher's weights again), in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(lm_student_config(spec), dtype=_dtype(spec))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise DistillError(f"export: the checkpoint does not fit the student spec "
                           f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def export_student(model_or_state, spec: dict, out_dir, tokenizer_dir, generation_config=None, dtype="float32") -> Path:
    """Write a trained student as a from_pretrained directory: config.json, model.safetensors,
    the tokenizer files and generation_config.json; loadable by AutoModelForCausalLM and vllm.LLM.

    model_or_state: the trained PreTrainedModel, or its state dict (then the model is rebuilt
    from ``lm_student_config(spec)``). generation_config: a GenerationConfig, a dict, or None
    (the model's own, else one from its config), with bos/eos/pad filled from the tokenizer. dtype: the
    weights' (a model is cast to it). The dir appears complete or not at all (written beside, renamed).
    """
    from transformers import AutoTokenizer, GenerationConfig

    out = Path(out_dir)
    model = from_state(spec, model_or_state) if isinstance(model_or_state, dict) else model_or_state
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as e:
        raise DistillError(f"lm.tokenizer: cannot load a tokenizer from {tokenizer_dir}: {type(e).__name__}: {e}") from None
    if len(tok) > model.config.vocab_size:
        raise DistillError(f"lm.tokenizer: {len(tok)} tokens in {tokenizer_dir}, more than the student's "
                           f"vocab_size {model.config.vocab_size}")
    if isinstance(generation_config, dict):
        gen = GenerationConfig(**generation_config)
    elif generation_config is not None:
        gen = generation_config
    else:
        gen = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, name, None) is None and getattr(tok, name, None) is not None:
            setattr(gen, name, getattr(tok, name))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config = gen
    model.to(getattr(torch, dtype)).save_pretrained(str(tmp))  # safetensors (transformers' only format since 5.0)
    tok.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
