"""Loading teachers and building students. Pure torch (+ transformers): no Ray.

Over 300 lines: the teachers of both tasks and the students' dispatch stay in one module, so
that what Serve serves is what evaluation scores.

Teachers, by task (``load_teacher``):
- classification: ``ClassifierTeacher``, backend ``torch`` (TorchScript, or ``module`` + a
  state_dict) or ``hf`` (a sequence classifier reading integer features as token ids):
  ``features [B, D] float32 -> logits [B, C] float32`` at T=1 (and with ``teachers[].features``
  ``forward_features``: logits + intermediate features, orchestrator/feature_capture.py);
- lm: ``CausalLMTeacher`` (backend ``hf``) or ``VLLMTeacher`` (backend ``vllm``, see
  orchestrator/vllm_teacher.py): ``windows [B, L] -> (top-k ids, log-probs) [B, L-1, k]``, and
  ``nll(windows) -> [B, L-1]``.
The Serve deployment (actors/teacher.py) and the evaluation both load teachers through here, so
what is served is exactly what is evaluated. Students: ``build_student`` from a plain spec.

Over 300 lines: both tasks' teacher loaders, the fingerprints and the tokenizer checks stay in
one file so that the deployment and the evaluation cannot load a teacher two different ways.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cls_students import build_cls_student
from .errors import DistillError
from .file_hashes import hash_files
from .packing import check_packing, logits_at, split_rows, topk_at  # noqa: F401  (re-exported)
from .students import build_lm_student


def check_teacher_files(cfg: dict) -> None:
    """Cheap driver-side checks, so a wrong path or file fails in one line before any deploy."""
    path, who = Path(cfg["path"]), f"teacher '{cfg['name']}'"
    if not path.exists():
        raise DistillError(f"{who}: path not found: {path}")
    if cfg["backend"] in ("hf", "vllm"):  # both load a from_pretrained directory
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise DistillError(f"{who}: {path} is not a from_pretrained directory (config.json: {e})") from None
        if needs_remote_code(config) and not cfg.get("trust_remote_code"):
            raise DistillError(f"{who}: {path} is a {config.get('model_type')} model whose code is in its dir "
                               f"(auto_map in config.json: {', '.join(config['auto_map'])}), not in transformers; "
                               "set trust_remote_code: true on this teacher if you trust that code")
        return
    if path.is_dir() or not zipfile.is_zipfile(path):
        raise DistillError(f"{who}: {path} is not a TorchScript or torch.save file; "
                           "save it with torch.jit.save, or torch.save(state_dict) plus `module`")


def needs_remote_code(config: dict) -> bool:
    """Does a config.json name its own code (auto_map) for a model_type transformers lacks?
    transformers then refuses it without trust_remote_code; with a model_type it ships, it uses
    its own class and ignores auto_map (as from_pretrained does, trust_remote_code unset)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return bool(config.get("auto_map")) and config.get("model_type") not in CONFIG_MAPPING


def student_source_problem(config: dict) -> str | None:
    """Why a config.json's dir cannot be a student's weights (None: it can). The student trains
    and is exported as a transformers class with full-precision weights."""
    if needs_remote_code(config):
        return (f"a {config.get('model_type')} model whose code is in its dir (auto_map), not in transformers; a "
                "student must be an architecture transformers ships: use init: scratch with a config of one, or "
                "such a pretrained dir")
    if isinstance(quant := config.get("quantization_config"), dict):
        return (f"quantized ({quant.get('quant_method', 'quantization_config')} in config.json); "
                "a student trains full-precision weights: give the unquantized checkpoint of the same model (the "
                "quantized one can still be a vllm teacher)")
    return None


# Where HF configs keep the longest sequence a model takes (llama/bert, gpt2, others).
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def check_lm_limits(teachers: list[dict], k: int, max_len: int, student_config: str | None) -> None:
    """task lm, before tokenizing or deploying anything: lm.k must fit every teacher's
    vocabulary, and a window of lm.max_len tokens every model's positions, as their config.json
    say (too long a window would fail, or silently degrade, deep inside a Serve replica)."""
    for t in teachers:
        check_teacher_files(t)  # path exists, config.json parses
        who, path = f"teacher '{t['name']}'", Path(t["path"]) / "config.json"
        hf = json.loads(path.read_text())
        vocab = hf.get("vocab_size")
        if isinstance(vocab, int) and k > vocab:
            raise DistillError(f"lm.k: {k} is larger than {who} vocabulary ({vocab} tokens); set lm.k <= {vocab}")
        _check_positions(who, path, hf, max_len)
        if t["backend"] == "vllm":  # vLLM counts the one token it generates per window as well
            set_len = (t.get("engine") or {}).get("max_model_len")
            engine_len = set_len or hf.get("max_position_embeddings") or 2048  # as vllm_teacher.py
            if max_len >= engine_len:
                whence = "teachers[].engine.max_model_len" if set_len else f"max_position_embeddings in {path}"
                raise DistillError(f"lm.max_len: windows of {max_len} tokens need {who} max_model_len > {max_len} (vLLM "
                                   f"adds one generated token; it is {engine_len}, {whence}); set lm.max_len <= {engine_len - 1}")
    if student_config:
        path = Path(student_config)
        try:
            hf = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DistillError(f"lm.student_config: cannot read {path}: {e}") from None
        _check_positions("the student (lm.student_config)", path, hf, max_len)


def _check_positions(who: str, path: Path, hf: dict, max_len: int) -> None:
    limit = next((int(hf[key]) for key in POSITION_KEYS if isinstance(hf.get(key), int)), None)
    if limit is not None and max_len > limit:
        raise DistillError(f"lm.max_len: {max_len} tokens is longer than {who} takes ({limit} positions in {path}); "
                           f"set lm.max_len <= {limit}")


def teacher_fingerprint(cfg: dict) -> str:
    """Hash of the teacher's config (what shapes its outputs) and every weights/tokenizer file."""
    check_teacher_files(cfg)
    path = Path(cfg["path"])
    spec = {k: cfg.get(k) for k in ("backend", "module", "kwargs")}
    # vLLM's dtype changes the outputs. Hashed as configured (the driver and the replica must agree,
    # and only the replica knows its platform); unset, the hash is what it was before `engine`.
    dtype = (cfg.get("engine") or {}).get("dtype")
    if dtype:
        spec["engine.dtype"] = dtype
    if cfg.get("features"):  # what the teacher returns; unset, the hash is what it was before features
        spec["features"], spec["pool"] = [str(f) for f in cfg["features"]], cfg.get("pool", "mean")
    # every file's bytes, cached by their stat: a 70B dir is ~140 GB (orchestrator/file_hashes.py)
    return hash_files(path, json.dumps(spec, sort_keys=True).encode(), f"teacher '{cfg['name']}'")[:16]


def teacher_device(cfg: dict) -> torch.device:
    """The GPU Ray gave a replica with teachers[].num_gpus > 0 (CUDA_VISIBLE_DEVICES), else the CPU.

    Where no GPU is visible (the driver evaluating on a CPU head node, say) the same teacher
    runs on the CPU: same weights, same outputs up to float rounding.
    """
    return torch.device("cuda") if cfg.get("num_gpus") and torch.cuda.is_available() else torch.device("cpu")


class ClassifierTeacher:
    """Loads a teacher from its config dict and runs it on feature batches."""

    def __init__(self, cfg: dict):
        self.name = cfg["name"]
        self.backend = cfg["backend"]
        self.device = teacher_device(cfg)
        path = Path(cfg["path"])
        if not path.exists():
            raise DistillError(f"teacher '{self.name}': path not found: {path}")
        try:
            self.model = self._load(cfg, path).eval().to(self.device)
        except DistillError:
            raise
        except Exception as e:  # a bad file is the user's input: say which teacher and why
            raise DistillError(f"teacher '{self.name}': cannot load {path}: {type(e).__name__}: {e}") from None
        self.vocab_size = getattr(getattr(self.model, "config", None), "vocab_size", None)
        self.capture = None  # teachers[].features: see forward_features
        if cfg.get("features"):
            from .feature_capture import FeatureCapture

            self.capture = FeatureCapture(self.name, self.backend, self.model, cfg["features"], cfg.get("pool", "mean"))
        # An hf teacher that ships its tokenizer reads that tokenizer's pad id as padding (text
        # rows, dataset.text, are padded with it); without one every position is a token.
        has_tokenizer = self.backend == "hf" and bool(tokenizer_files(path))
        self.pad_id = load_tokenizer(path, f"teacher '{self.name}'").pad_token_id if has_tokenizer else None

    def _load(self, cfg: dict, path: Path) -> nn.Module:
        if self.backend == "hf":
            from transformers import AutoModelForSequenceClassification

            return AutoModelForSequenceClassification.from_pretrained(  # float32, as torch teachers (and students)
                str(path), local_files_only=True, dtype=torch.float32, trust_remote_code=bool(cfg.get("trust_remote_code")))
        if cfg.get("module"):
            mod, cls = cfg["module"].split(":")
            model = getattr(importlib.import_module(mod), cls)(**cfg.get("kwargs", {}))
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model
        return torch.jit.load(str(path), map_location="cpu")

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return self._forward(features)[0]

    def forward_features(self, features: np.ndarray) -> dict:
        """{"logits": [B, C], "features": {LAYER: [B, D] or [B, L, D]}} in one forward pass."""
        self.capture.reset()
        logits, out = self._forward(features, hidden=True)
        hs = out.hidden_states if self.backend == "hf" else None
        mask = torch.ones(hs[0].shape[:2], device=hs[0].device) if hs else None  # every token is real
        return {"logits": logits, "features": self.capture.collect(hs, mask)}

    @torch.inference_mode()
    def _forward(self, features: np.ndarray, hidden: bool = False):
        """(logits [B, C] float32 numpy, the model's raw output)."""
        x = torch.from_numpy(np.array(features, dtype=np.float32)).to(self.device)  # a copy: Arrow buffers are read-only
        if self.backend == "hf":
            # Sequence classifiers read integer token ids: feature values are used as ids.
            ids = x.round().long()
            if not torch.equal(ids.float(), x) or ids.min() < 0 or (self.vocab_size and ids.max() >= self.vocab_size):
                raise DistillError(
                    f"teacher '{self.name}': hf backend needs integer features in [0, {self.vocab_size}) as token ids"
                )
            mask = torch.ones_like(ids) if self.pad_id is None else (ids != self.pad_id).long()
            raw = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
            out = raw.logits
        else:
            try:
                out = raw = self.model(x)
            except RuntimeError as e:  # most often a feature width the teacher was not built for
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
                raise DistillError(f"teacher '{self.name}': fails on rows of {x.shape[-1]} features ({lines[-1]}); "
                                   "check that dataset.features matches what the teacher was trained on") from None
        return out.float().cpu().numpy(), raw


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "special_tokens_map.json")


def tokenizer_files(path: str | Path) -> list[Path]:
    """The vocabulary files a from_pretrained dir has (empty: no tokenizer)."""
    return [Path(path) / f for f in TOKENIZER_FILES if (Path(path) / f).is_file()]


def tokenizer_hash(path: str | Path) -> str | None:
    """Hash of the vocabulary files in a from_pretrained dir (None if it has none)."""
    found = tokenizer_files(path)
    if not found:
        return None
    h = hashlib.sha256()
    for f in found:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=32)
def vocabulary_hash(path: str | Path, files: str) -> str:
    """Hash of the id -> token map of a from_pretrained dir's tokenizer (vocabulary and added
    tokens; `files`: its tokenizer_hash, so a changed dir is read again). Checkpoints of one family
    can ship tokenizer files that differ in bytes (formatting, the saving library's version, the
    pad token) and still map every id to the same token: they read the same ids."""
    vocab = load_tokenizer(path).get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode()).hexdigest()[:16]


def same_vocabulary(a: str | Path, b: str | Path, hashes: tuple | None = None) -> bool:
    """Do two from_pretrained dirs' tokenizers read the same ids? The same files, or files that
    differ in bytes but map every id to the same token. False when either has no tokenizer.
    hashes: their tokenizer_hash values when the caller has them already."""
    ha, hb = hashes or (tokenizer_hash(a), tokenizer_hash(b))
    if ha is None or hb is None:
        return False
    return ha == hb or vocabulary_hash(str(a), ha) == vocabulary_hash(str(b), hb)


def load_tokenizer(path: str | Path, field: str = "lm.tokenizer"):
    from transformers import AutoTokenizer

    try:
        # trust_remote_code False, not unset: unset, transformers asks on stdin whether to run a dir's code
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        try:
            custom = "auto_map" in json.loads((Path(path) / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            custom = False
        if custom:  # the pipeline runs no tokenizer code: one tokenizer is read in many processes
            raise DistillError(f"{field}: the tokenizer in {path} is its own code (auto_map in tokenizer_config.json), "
                               "which is not run; save the same vocabulary as a standard tokenizer (tokenizer.json) "
                               "in a dir and set lm.tokenizer (task lm) or student.tokenizer to it") from None
        raise DistillError(f"{field}: cannot load a tokenizer from {path}: {type(e).__name__}: {e}") from None


class CausalLMTeacher:
    """Causal LM -> per position t, the top-k log-probs (T=1) of token t+1.

    Windows [B, L] int token ids -> (ids [B, L-1, k] int32, logprobs [B, L-1, k] float32); the
    last position (which predicts past the window) is dropped, matching vLLM's prompt_logprobs,
    which starts at the second token. Packed instruction rows [B, 3, L] -> ([N, k], [N, k]) for
    the N positions whose next token carries loss, in row order (see ``split_rows``).
    """

    def __init__(self, cfg: dict, k: int):
        self.name, self.k = cfg["name"], k
        self.device = teacher_device(cfg)
        path = Path(cfg["path"])
        if not path.exists():
            raise DistillError(f"teacher '{self.name}': path not found: {path}")
        from transformers import AutoModelForCausalLM

        # On a GPU the checkpoint's own dtype (bf16/fp16 for most LLMs); on the CPU float32, said
        # explicitly: transformers 5 loads a checkpoint in its own dtype when none is given.
        dtype = "auto" if self.device.type == "cuda" else torch.float32
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype,
                                                              trust_remote_code=bool(cfg.get("trust_remote_code")))
            self.model = self.model.eval().to(self.device)
        except Exception as e:
            raise DistillError(f"teacher '{self.name}': cannot load {path}: {type(e).__name__}: {e}") from None
        self.vocab_size = self.model.config.vocab_size
        if k > self.vocab_size:
            raise DistillError(f"lm.k: {k} is larger than teacher '{self.name}' vocabulary ({self.vocab_size})")
        self.features, self.pool = list(cfg.get("features") or []), cfg.get("pool", "mean")  # forward_features
        if self.features:
            from .feature_capture import _check_indices

            _check_indices(self.name, self.features, self.model.config.num_hidden_layers)

    def _topk(self, rows: np.ndarray, keep: list[int] | None = None) -> tuple:
        """(top-k ids, top-k log-probs, true next token's NLL, the answer's shape[, {index: hidden
        [B, L, D]}, sel, windows]): log-softmax and top-k on the device, over chunks of positions
        (packing.topk_at): only [.., k] ids and log-probs cross to the host, and no [N, V] logits
        of a whole large batch are held. keep: the hidden-state indices of teachers[].features."""
        x = torch.from_numpy(np.array(rows, dtype=np.int64)).to(self.device)
        ids, kwargs, sel = split_rows(x)
        if x.dim() == 3:
            check_packing(self.model, f"teacher '{self.name}'")
        shape = (ids.shape[0], ids.shape[1] - 1) if x.dim() == 2 else (-1,)
        if not keep:
            return (*topk_at(self.model, ids, kwargs, sel, self.k, ids[:, 1:][sel]), shape)
        got, hidden = topk_at(self.model, ids, kwargs, sel, self.k, ids[:, 1:][sel], keep)
        return (*got, shape, hidden, sel, x.dim() == 2)

    @torch.inference_mode()
    def forward_features(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """``__call__``'s (top-k ids, log-probs) + {LAYER: float16 features} from the same forward
        pass, kept at the positions the store labels (orchestrator/lm_features.py)."""
        from .lm_features import keep_positions

        top_ids, top_lps, _, shape, hidden, sel, windows = self._topk(rows, self.features)
        feats = {str(i): keep_positions(hidden[i], sel, self.pool, windows).cpu().numpy() for i in self.features}
        return (top_ids.int().reshape(*shape, self.k).cpu().numpy(),
                top_lps.reshape(*shape, self.k).cpu().numpy(), feats)

    @torch.inference_mode()
    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.score(rows)[:2]

    @torch.inference_mode()
    def score(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One forward pass: (top-k ids, top-k log-probs) and the true next token's NLL, shaped
        as ``__call__``'s (evaluation needs both; two passes would double its time)."""
        top_ids, top_lps, nll, shape = self._topk(rows)
        return (top_ids.int().reshape(*shape, self.k).cpu().numpy(), top_lps.reshape(*shape, self.k).cpu().numpy(),
                nll.reshape(shape).cpu().numpy())

    @torch.inference_mode()
    def nll(self, rows: np.ndarray) -> np.ndarray:
        """Negative log-likelihood of the true next token: [B, L-1] for windows, [N] packed."""
        return self.score(rows)[2]


def load_teacher(cfg: dict, task: str = "classification", k: int = 8):
    """The callable a teacher deployment serves, by task and backend."""
    if cfg["backend"] in ("hf", "vllm") and Path(cfg["path"]).exists():
        check_teacher_files(cfg)  # e.g. code in its dir without trust_remote_code: the driver's one line
    if task == "lm":
        if cfg["backend"] == "vllm":
            from .vllm_teacher import VLLMTeacher

            return VLLMTeacher(cfg, k)
        return CausalLMTeacher(cfg, k)
    return ClassifierTeacher(cfg)


class MLPStudent(nn.Module):
    """features [B, D] -> logits [B, C]; inputs standardised by stats fixed at build time."""

    def __init__(self, in_dim: int, num_classes: int, hidden: list[int], mean=None, std=None):
        super().__init__()
        dims = [in_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], num_classes))
        # Buffers, so the checkpoint carries the normalisation the student was trained with.
        self.register_buffer("mean", torch.as_tensor(mean if mean is not None else np.zeros(in_dim), dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std if std is not None else np.ones(in_dim), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def build_student(spec: dict) -> nn.Module:
    """spec, plain data (it pickles): {arch: "mlp", in_dim, num_classes, hidden, mean, std}, {arch: "hf", ...}
    (orchestrator.cls_students) or {arch: "causal_lm", init, ...} (orchestrator.students; init default scratch)."""
    if spec["arch"] == "causal_lm":
        return build_lm_student({"init": "scratch", **{k: v for k, v in spec.items() if k != "arch"}})
    if spec["arch"] == "hf":
        return build_cls_student(spec)
    if spec["arch"] != "mlp":
        raise DistillError(f"student.arch: unknown '{spec['arch']}' (allowed: mlp, hf)")
    return MLPStudent(spec["in_dim"], spec["num_classes"], spec["hidden"], spec.get("mean"), spec.get("std"))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
