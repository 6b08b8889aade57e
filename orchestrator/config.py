"""One YAML file describes a whole run; validated on load, unknown keys forbidden.

``load_config(path, overrides)`` returns a ``DistillConfig`` or raises ``DistillError`` with
one line naming every bad field path and what is allowed. Overrides are ``section.key=value``
strings (value parsed as YAML, list items addressed by index: ``teachers.0.weight=2``).

Over 300 lines: it is the whole config schema, one small model per section, and the checks
that span sections (keys a task never reads, the LM student's source) sit beside them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import DistillError

EnsembleMode = Literal["mean_prob", "mean_logit", "entropy", "best_teacher", "ca_mkd"]
LossName = Literal["kd", "forward_kl", "reverse_kl", "jsd"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Strict):
    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$")


class DatasetConfig(_Strict):
    source: str  # "sklearn:digits" or a local .parquet / .csv path
    features: str | list[str] = "features"
    label: str = "label"
    text: str = "text"  # task lm, format text: the text column
    # task lm: text (raw text packed into windows, loss on every token), prompt_response (loss on
    # the response tokens only) or chat (a list of {role, content} messages rendered with the
    # tokenizer's chat template; loss on the assistant turns only). See orchestrator/instruct.py.
    format: Literal["text", "prompt_response", "chat"] = "text"
    prompt: str = "prompt"  # format prompt_response: the prompt column
    response: str = "response"  # format prompt_response: the response column
    messages: str = "messages"  # format chat: the messages column
    test_source: Optional[str] = None  # a separate held-out file instead of test_fraction
    id_column: Optional[str] = None
    test_fraction: float = Field(0.3, gt=0, lt=1)
    seed: int = 0
    limit: Optional[int] = Field(None, gt=0)  # first N rows only (smoke tests)


class EngineConfig(_Strict):
    """teachers[].engine (backend vllm): passed to vllm.LLM. Unset keys are decided inside the
    replica by platform (orchestrator/vllm_teacher.py engine_args, which logs each decision)."""

    dtype: Optional[Literal["auto", "float32", "bfloat16", "float16"]] = None  # GPU: auto (checkpoint's); CPU: float32
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1)  # GPU: 0.9 x the replica's share of its GPU
    max_model_len: Optional[int] = Field(None, ge=2)  # default: the checkpoint's max_position_embeddings
    tensor_parallel_size: int = Field(1, ge=1)  # > 1: one GPU per shard, a placement group per replica
    enforce_eager: Optional[bool] = None  # GPU: false (CUDA graphs); CPU: true
    kv_cache_gib: Optional[float] = Field(None, gt=0)  # CPU: 1; GPU: unset (sized by gpu_memory_utilization)
    max_num_seqs: Optional[int] = Field(None, ge=1)  # vLLM's default


class TeacherConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    backend: Literal["torch", "hf", "vllm"]
    path: str  # TorchScript file, state_dict file (with `module`), or HF from_pretrained dir
    module: Optional[str] = Field(None, pattern=r"^[\w.]+:\w+$")  # "pkg.mod:Class" for state_dict
    kwargs: dict[str, Any] = {}
    weight: float = Field(1.0, ge=0)
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0, ge=0)
    max_batch_size: int = Field(256, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    # Placement: custom resources each replica needs, e.g. {teacher_node: 1} to pin replicas
    # to the node type that declares that resource.
    resources: dict[str, float] = {}
    # Attach to this already-running Serve application (e.g. a RayService) instead of
    # deploying one; it is left running. `path` must still name the same weights.
    serve_app: Optional[str] = None
    # Serve's health check of each replica; it answers while a forward pass runs (actors/teacher.py).
    health_check_period_s: float = Field(5.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)  # Serve's default
    engine: Optional[EngineConfig] = None  # backend vllm only
    # hf / vllm: run the Python files of the teacher's dir (config.json's auto_map: an architecture
    # transformers does not ship). transformers' and vLLM's trust_remote_code; only for code you trust.
    trust_remote_code: bool = False
    # Intermediate features stored beside the logits (orchestrator/features.py; task lm: lm_features.py):
    # hf: hidden-state indices (0 = embeddings); torch (module + state_dict): module names, by forward hook.
    features: list[int | str] = []
    pool: Literal["cls", "mean", "none"] = "mean"  # token-level [B, L, D] features: first token, mean, or kept

    @model_validator(mode="after")
    def _features_fit(self):
        if self.pool != "mean" and not self.features:  # the default may be written out (a dumped config)
            raise ValueError(f"pool: applies with features only (teacher '{self.name}'); remove it or list features")
        if not self.features:
            return self
        if self.backend == "vllm":
            raise ValueError(f"features: backend vllm returns no intermediate features (teacher '{self.name}'); remove them")
        if self.backend == "torch" and not self.module:
            raise ValueError(f"features: a TorchScript teacher takes no forward hooks (teacher '{self.name}'); "
                             "give it as module (pkg.mod:Class) + state_dict path")
        want = int if self.backend == "hf" else str
        wrong = [f for f in self.features if not isinstance(f, want) or isinstance(f, bool)]
        if wrong:
            what = "hidden-state indices (integers)" if want is int else "module names (strings)"
            raise ValueError(f"features: backend {self.backend} takes {what}, got {wrong[0]!r} (teacher '{self.name}')")
        if len(set(map(str, self.features))) != len(self.features):
            raise ValueError(f"features: listed twice on teacher '{self.name}': {self.features}")
        return self

    @model_validator(mode="after")
    def _one_gpu_unless_vllm(self):
        if self.num_gpus > 1 and self.backend != "vllm" and self.serve_app is None:
            raise ValueError(f"num_gpus: teacher '{self.name}' (backend {self.backend}) runs on one GPU of its replica "
                             f"(it asks {self.num_gpus:g}, the rest would sit idle); use num_gpus <= 1 (replicas for more "
                             "throughput), or backend vllm with engine.tensor_parallel_size for a model larger than a GPU")
        return self

    @model_validator(mode="after")
    def _remote_code_backend(self):
        if self.trust_remote_code and self.backend == "torch":
            raise ValueError(f"trust_remote_code: applies to backends hf and vllm (teacher '{self.name}' is torch, "
                             "whose code is named by module); remove it")
        return self

    @model_validator(mode="after")
    def _engine_fits(self):
        if self.engine is None:
            return self
        if self.backend != "vllm":
            raise ValueError(f"engine: vLLM engine settings apply to backend vllm only (teacher '{self.name}' "
                             f"is {self.backend}); remove engine")
        tp = self.engine.tensor_parallel_size
        if tp > 1 and self.num_gpus != tp:
            raise ValueError(f"engine.tensor_parallel_size: {tp} shards need num_gpus: {tp} (one GPU each) on teacher "
                             f"'{self.name}' (got num_gpus: {self.num_gpus:g})")
        return self


class LMConfig(_Strict):
    """task: lm. Text is tokenized once (one tokenizer for the ensemble) and packed into
    windows of max_len tokens; teachers return the top-k next-token log-probs per position."""

    tokenizer: Optional[str] = None  # local tokenizer dir; default: the first teacher's dir
    max_len: int = Field(128, ge=2)
    k: int = Field(8, ge=1)
    student_config: Optional[str] = None  # HF config.json: a causal LM trained from scratch
    # formats prompt_response / chat: several examples per window, kept apart (position ids
    # restart at each example, so no attention crosses one), or false: one example per window.
    packing: bool = True


class EnsembleConfig(_Strict):
    mode: EnsembleMode = "mean_prob"
    temperature: float = Field(4.0, gt=0)  # T of the soft targets, also used by the loss
    tau: float = Field(1.0, gt=0)  # sharpness of the per-sample weights in `entropy` mode


class StoreConfig(_Strict):
    path: Optional[str] = None  # default: <output_dir>/<run.name>/store; may be a URI
    shard_size: int = Field(256, ge=1)


class LabelConfig(_Strict):
    # Where shards are labeled: "driver" = threads in the driver process (no labeler processes
    # to start: the fastest on one node), "ray_data" = a Ray Data actor pool (labeler CPU work
    # spread over the cluster's nodes), "auto" = driver on a one-node cluster, else ray_data.
    executor: Literal["auto", "driver", "ray_data"] = "auto"
    concurrency: int = Field(2, ge=1)  # shards in flight: driver threads, or Ray Data labeler actors
    num_cpus: float = Field(0.25, ge=0)  # per Ray Data labeler actor (they mostly wait on teachers)


class StudentConfig(_Strict):
    # task classification: mlp (an MLP over the features) or hf (a transformer sequence classifier over
    # token ids, orchestrator/cls_students.py: its weights from init / config / path / teacher / layers below)
    arch: Literal["mlp", "hf"] = "mlp"
    hidden: list[int] = [32]  # arch mlp
    tokenizer: Optional[str] = None  # arch hf: a tokenizer dir exported with the student (default: an hf teacher's, if any)
    # task lm (and arch hf): where the student's weights come from (orchestrator/students.py)
    init: Literal["scratch", "pretrained", "teacher"] = "scratch"
    config: Optional[str] = None  # init scratch: an HF config.json (lm.student_config is the same)
    path: Optional[str] = None  # init pretrained: a local from_pretrained causal-LM dir
    teacher: Optional[str] = None  # init teacher: the teacher (by name) whose layers the student keeps
    layers: Optional[list[int]] = None  # init teacher: indices of its decoder layers to keep, in order
    # task lm / arch hf: the exported weights' dtype (training is float32 either way). auto: the
    # dtype of the checkpoint the student started from (init pretrained / teacher), float32 from scratch.
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @model_validator(mode="after")
    def _positive(self):
        if any(h <= 0 for h in self.hidden):
            raise ValueError(f"hidden sizes must be > 0, got {self.hidden}")
        return self


class OnPolicyConfig(_Strict):
    """train.on_policy (task lm, instruction data): with probability `fraction` a batch's prompts are
    completed by the current student and the Serve teachers score its samples (actors/on_policy.py)."""

    fraction: float = Field(0.5, ge=0, le=1)  # lambda: probability that a considered batch is on-policy
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, ge=0)  # the student's sampling temperature; 0: greedy
    every: int = Field(1, ge=1)  # only every N-th batch is considered (1: every batch)
    divergence: Literal["reverse_kl", "jsd", "forward_kl"] = "reverse_kl"  # over the sampled positions
    beta: float = Field(0.5, ge=0, le=1)  # jsd: mixture weight
    # hf: our decode loop (orchestrator/generation.py) on the training student; vllm: a vLLM engine
    # on each train worker, the student's weights copied into it before every on-policy batch
    # (orchestrator/vllm_sampler.py). engine: that engine's settings (sampler vllm only).
    sampler: Literal["hf", "vllm"] = "hf"
    engine: Optional[EngineConfig] = None

    @model_validator(mode="after")
    def _engine_with_vllm(self):
        if self.engine is not None and self.sampler != "vllm":
            raise ValueError("engine: vLLM engine settings apply to sampler vllm only; set sampler: vllm or remove engine")
        if self.engine is not None and self.engine.tensor_parallel_size != 1:
            raise ValueError("engine.tensor_parallel_size: the on-policy sampler runs on one train worker's device: use 1")
        return self


class TrainConfig(_Strict):
    workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    worker_resources: dict[str, float] = {}  # placement: custom resources per train worker
    use_gpu: bool = False
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    loss: LossName = "kd"
    alpha: float = Field(0.1, ge=0, le=1)  # kd: weight of the hard-label CE
    beta: float = Field(0.5, ge=0, le=1)  # jsd: mixture weight
    max_failures: int = Field(0, ge=0)
    max_samples: Optional[int] = Field(None, gt=0)  # train on the first N stored rows only
    cache_rows: int = Field(200_000, ge=0)  # a worker shard up to this many rows is kept in memory
    # A store up to this size is read by the driver (pyarrow) and handed to Ray Data whole;
    # a larger one streams with ray.data.read_parquet (which costs seconds to plan small files).
    read_in_driver_mb: float = Field(256, ge=0)
    seed: int = 0
    # The optimiser's schedule (defaults: constant lr, no clipping, one batch per step).
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # after warmup; decays to min_lr_ratio
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: Optional[float] = Field(None, gt=0)  # max global gradient norm
    grad_accum: int = Field(1, ge=1)  # batches per optimiser step (global batch = workers x batch_size x this)
    max_steps: Optional[int] = Field(None, ge=1)  # stop after this many optimiser steps (epochs is then a ceiling)
    # Also checkpoint every N optimiser steps within an epoch (None: once per epoch); a resume from
    # one is exact: the epoch's batches already consumed are skipped, none seen twice or missed.
    checkpoint_every: Optional[int] = Field(None, ge=1)
    # How the student is spread over the workers: ddp (a full copy each), or fsdp (parameters,
    # gradients and optimiser state sharded; one unit per decoder layer, or the whole student as one
    # unit when it names no such layer: the MLP and BERT-style classifiers), for students too large for one device.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # Keep only each transformer layer's input for backward and recompute the rest there:
    # activation memory ~ one layer instead of all of them, for about one more forward per step.
    gradient_checkpointing: bool = False
    # Feature / relation terms beside the response loss (check_extra_loss below; built by
    # orchestrator/feature_losses.py build_extra_loss; added to the train step by orchestrator/extra_terms.py).
    extra_losses: list[dict[str, Any]] = []
    on_policy: Optional[OnPolicyConfig] = None  # task lm, instruction data: see OnPolicyConfig


class EvalConfig(_Strict):
    baseline: bool = True  # also train the same student on hard labels only (`student_hard`)
    # task lm, instruction formats: each student answers the held-out prompts (up to this many new
    # tokens; 0: off) and the teacher ensemble scores the answers: `teacher_nll_of_samples` in the
    # report (orchestrator/sample_eval.py). Temperature 0: greedy; else fixed-seed samples.
    sample_max_new_tokens: int = Field(32, ge=0)
    sample_temperature: float = Field(0.0, ge=0)
    sample_seed: int = 0


class RayConfig(_Strict):
    address: Optional[str] = None  # None: RAY_ADDRESS if set, else an embedded local Ray
    num_cpus: Optional[int] = Field(None, ge=1)  # embedded Ray only


class MetricsConfig(_Strict):
    port: Optional[int] = Field(None, ge=1, le=65535)  # driver's /metrics (prometheus_client); None: off
    linger_s: float = Field(0.0, ge=0)  # keep the endpoint up after the command, for a last scrape


class GenerateConfig(_Strict):
    """`distill generate` (task lm, dataset.format prompt_response | chat): teachers write responses
    to the dataset's prompts; see orchestrator/generate.py. `distill run` never reads this section."""

    n: int = Field(1, ge=1)  # responses per prompt per teacher
    temperature: float = Field(1.0, ge=0)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(32, ge=1)
    seed: int = 0  # with the prompt id, teacher and sample index: each sample's own RNG
    cross_score: bool = True  # every teacher scores every response; curation then uses the ensemble's NLL
    max_nll: Optional[float] = Field(None, gt=0)  # drop responses above this NLL per token
    keep: Optional[int] = Field(None, ge=1)  # keep the best (lowest NLL) per prompt
    block_size: int = Field(8, ge=1)  # prompts per output part (the unit written exactly once)
    output: Optional[str] = None  # default: <output_dir>/<run.name>/generated
    # Also write each prompt's own (reference) answer into generated.parquet (column origin:
    # reference | teacher), so that `distill run` on it trains on both. Curation only: no regeneration.
    include_reference: bool = False


EXTRA_LOSS_KINDS = ("hint", "attention", "rkd_distance", "rkd_angle", "similarity")
_EXTRA_LOSS_KEYS = ("kind", "weight", "teacher", "teacher_layer", "student_layer", "distance", "source")


def check_extra_loss(spec: Any, where: str = "train.extra_losses") -> dict:
    """One ``train.extra_losses`` entry, checked and with its defaults filled in; a bad entry raises
    DistillError naming the field (``where.field``). Which teachers exist is checked by the caller."""
    if not isinstance(spec, dict):
        raise DistillError(f"{where}: expected a mapping with kind, weight, teacher, teacher_layer, student_layer "
                           f"(got {spec!r})")
    unknown = [k for k in spec if k not in _EXTRA_LOSS_KEYS]
    if unknown:
        raise DistillError(f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(_EXTRA_LOSS_KEYS)})")
    out = {"weight": 1.0, "distance": "mse", "source": "attention", **spec}
    if out.get("kind") not in EXTRA_LOSS_KINDS:
        raise DistillError(f"{where}.kind: {out.get('kind')!r} is not one of {', '.join(EXTRA_LOSS_KINDS)}")
    w = out["weight"]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
        raise DistillError(f"{where}.weight: must be a number >= 0 (got {w!r})")
    if not isinstance(out.get("teacher"), str) or not out["teacher"]:
        raise DistillError(f"{where}.teacher: required: a teacher's name, or ensemble (got {out.get('teacher')!r})")
    for key in ("teacher_layer", "student_layer"):
        v = out.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, str)) or v == "":
            raise DistillError(f"{where}.{key}: required: a hidden-state index or a module name (got {v!r})")
    if "distance" in spec and out["kind"] != "hint":
        raise DistillError(f"{where}.distance: applies to kind hint only (this term is {out['kind']}); remove it")
    if out["distance"] not in ("mse", "cosine"):
        raise DistillError(f"{where}.distance: {out['distance']!r} is not mse or cosine")
    if "source" in spec and out["kind"] != "attention":
        raise DistillError(f"{where}.source: applies to kind attention only (this term is {out['kind']}); remove it")
    if out["source"] not in ("attention", "activation"):
        raise DistillError(f"{where}.source: {out['source']!r} is not attention or activation")
    return out


def _check_extra_losses(extra: list, teachers: dict[str, list]) -> None:
    """train.extra_losses: every entry well-formed, naming a configured teacher (or ensemble) that
    captures its teacher_layer (teachers: name -> that teacher's `features`)."""
    for i, spec in enumerate(extra):
        spec = check_extra_loss(spec, f"train.extra_losses.{i}")
        if spec["teacher"] != "ensemble" and spec["teacher"] not in teachers:
            raise DistillError(f"train.extra_losses.{i}.teacher: no teacher named '{spec['teacher']}' "
                               f"(teachers: {', '.join(teachers)}, or ensemble)")
        named = teachers if spec["teacher"] == "ensemble" else {spec["teacher"]: teachers[spec["teacher"]]}
        if lacking := [n for n, feats in named.items() if spec["teacher_layer"] not in feats]:
            raise DistillError(f"train.extra_losses.{i}.teacher_layer: teacher '{lacking[0]}' does not capture "
                               f"{spec['teacher_layer']!r}; add it to that teacher's features")


def _check_on_policy(cfg) -> None:
    """train.on_policy needs prompts to complete: task lm with instruction data. (Under train.strategy
    fsdp each worker gathers the whole student to sample: actors/fsdp_sampling.py.)"""
    if cfg.task != "lm" or cfg.dataset.format == "text":
        what = f"task {cfg.task}" if cfg.task != "lm" else "dataset.format text (no prompts)"
        raise ValueError(f"train.on_policy: needs task lm with instruction data (dataset.format prompt_response or chat), "
                         f"got {what}; remove train.on_policy")


# Per task, the keys it never reads (None: the whole section).
TASK_UNUSED: dict[str, dict[str, tuple[str, ...] | None]] = {
    "classification": {"dataset": ("text", "format", "prompt", "response", "messages"), "lm": None, "generate": None,
                       "eval": ("sample_max_new_tokens", "sample_temperature", "sample_seed"),
                       "student": ("init", "config", "path", "teacher", "layers", "tokenizer", "export_dtype")},
    "lm": {"dataset": ("features", "label", "id_column"), "student": ("arch", "hidden", "tokenizer")},
}
# student.arch hf (task classification) reads the weight-source keys, not the MLP's, and may read
# a text column (dataset.text) instead of the features.
HF_CLS_UNUSED = {"student": ("hidden",), "dataset": ("format", "prompt", "response", "messages")}


class DistillConfig(_Strict):
    run: RunConfig = RunConfig()
    task: Literal["classification", "lm"] = "classification"
    output_dir: str = "runs"
    dataset: DatasetConfig
    teachers: list[TeacherConfig] = Field(min_length=1)
    ensemble: EnsembleConfig = EnsembleConfig()
    store: StoreConfig = StoreConfig()
    label: LabelConfig = LabelConfig()
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    ray: RayConfig = RayConfig()
    metrics: MetricsConfig = MetricsConfig()
    lm: LMConfig = LMConfig()
    generate: GenerateConfig = GenerateConfig()

    @model_validator(mode="after")
    def _lm_needs(self):
        if ignored := self.ignored_keys():
            where, hint = f"task {self.task}", "set the task that uses it"
            if self.task == "classification" and ignored[0].startswith("student."):  # arch mlp and hf read different keys
                where += f" with student.arch {self.student.arch}"
                hint = f"set student.arch: {'hf' if self.student.arch == 'mlp' else 'mlp'}"
            raise ValueError(f"{ignored[0]}: not used by {where}"
                             + (f" (nor {', '.join(ignored[1:])})" if ignored[1:] else "")
                             + f"; remove it, or {hint}")
        if self.task == "lm" or self.student.arch == "hf":
            self._check_lm_student()
        if self.text_classification and "features" in self.dataset.model_fields_set:
            raise ValueError("dataset.features: give dataset.text (a text column, tokenized) or dataset.features "
                             "(token ids), not both")
        if self.task == "lm":
            if any(t.backend == "torch" for t in self.teachers):
                raise ValueError("teachers: task lm needs causal-LM teachers (backend hf or vllm)")
        elif any(t.backend == "vllm" for t in self.teachers):
            raise ValueError("teachers: backend vllm serves causal LMs: set task: lm")
        if self.train.on_policy is not None:
            _check_on_policy(self)
        if self.train.gradient_checkpointing and self.task == "classification" and self.student.arch == "mlp":
            raise ValueError("train.gradient_checkpointing: applies to transformer students (task lm, or "
                             "student.arch hf); the MLP student has no layers to recompute; remove it")
        return self

    @field_validator("teachers")
    @classmethod
    def _unique_teachers(cls, teachers: list[TeacherConfig]) -> list[TeacherConfig]:
        names = [t.name for t in teachers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"teacher names must be unique, repeated: {', '.join(dup)}")
        if teachers and sum(t.weight for t in teachers) <= 0:
            raise ValueError("at least one teacher needs weight > 0")
        return teachers

    def _check_lm_student(self) -> None:
        s, need = self.student, {"scratch": "config", "pretrained": "path", "teacher": "teacher"}[self.student.init]
        if self.lm.student_config and s.config and self.lm.student_config != s.config:
            raise ValueError("lm.student_config and student.config name different files: keep one")
        if s.init == "scratch" and not (s.config or self.lm.student_config):
            which = "task lm" if self.task == "lm" else "student.arch hf"
            raise ValueError(f"student.config: required for {which} with student.init scratch "
                             "(an HF config.json; or start from student.init pretrained / teacher)")
        if s.init != "scratch" and getattr(s, need) is None:
            raise ValueError(f"student.{need}: required with student.init {s.init}")
        wrong = [k for k in ("config", "path", "teacher", "layers") if getattr(s, k) is not None
                 and k not in {"scratch": ("config",), "pretrained": ("path",), "teacher": ("teacher", "layers")}[s.init]]
        if wrong:
            raise ValueError(f"student.{wrong[0]}: not used with student.init {s.init}")
        if s.init == "teacher":
            if s.teacher not in [t.name for t in self.teachers]:
                raise ValueError(f"student.teacher: no teacher named '{s.teacher}' "
                                 f"(teachers: {', '.join(t.name for t in self.teachers)})")
            if not s.layers:
                raise ValueError("student.layers: required with student.init teacher (the teacher's decoder "
                                 "layer indices to keep, e.g. [0, 2, 4])")
            backend = next(t.backend for t in self.teachers if t.name == s.teacher)
            if self.task == "classification" and backend != "hf":
                raise ValueError(f"student.teacher: '{s.teacher}' is a {backend} teacher; student.init teacher keeps an "
                                 "hf sequence classifier's layers (name an hf teacher, or use init scratch / pretrained)")

    @property
    def student_spec_source(self) -> dict:
        """task lm / arch hf: the student's weights source as orchestrator.students takes it (paths resolved)."""
        s = self.student
        if s.init == "scratch":
            return {"init": "scratch", "config_file": s.config or self.lm.student_config}
        # Absolute: Ray Train workers run in their own working directory, so a path relative to
        # the driver's (artifacts/..., as in examples/lm_instruct.yaml) would not be found there.
        def local(path: str) -> str:
            return path if "://" in path else str(Path(path).resolve())

        if s.init == "pretrained":
            return {"init": "pretrained", "path": local(s.path)}
        teacher = next(t for t in self.teachers if t.name == s.teacher)
        return {"init": "teacher", "path": local(teacher.path), "layers": list(s.layers)}

    @property
    def text_classification(self) -> bool:
        """Classification from a text column (dataset.text given, student.arch hf): the rows are
        tokenized with the ensemble's tokenizer and stored as token ids (orchestrator/prepare.py)."""
        return self.task == "classification" and self.student.arch == "hf" and "text" in self.dataset.model_fields_set

    def ignored_keys(self) -> list[str]:
        """Keys set in the config, to other than their defaults, that the chosen task never reads,
        as dotted paths: refused, so that nothing a user wrote is silently dropped (a dumped
        config, every default written out, still loads)."""
        found = []
        unused = HF_CLS_UNUSED if self.task == "classification" and self.student.arch == "hf" else {}
        for section, keys in {**TASK_UNUSED[self.task], **unused}.items():
            sub = getattr(self, section)
            given = sub.model_fields_set if keys is None else sub.model_fields_set & set(keys)
            found += [f"{section}.{k}" for k in sorted(given) if getattr(sub, k) != type(sub).model_fields[k].default]
        return found

    # Derived locations: one folder per run.
    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run.name

    @property
    def store_path(self) -> str:
        return self.store.path or str(self.run_dir / "store")

    @property
    def generate_path(self) -> Path:
        return Path(self.generate.output) if self.generate.output else self.run_dir / "generated"


def _format_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "model_type":  # pydantic would name our internal class (TrainConfig...)
            msg = f"expected a section of key: value pairs (got {e['input']!r})"
        elif "input" in e and e["type"] not in ("model_type", "dict_type", "value_error"):  # our own say it
            msg += f" (got {e['input']!r})"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise DistillError(f"override '{dotted}': no item {key} in {'.'.join(keys[:i])}")
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise DistillError(f"override '{dotted}': {'.'.join(keys[: i + 1])} is not a section")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise DistillError(f"override '{dotted}': no item {last}")
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DistillError(f"override '{item}': expected section.key=value")
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw else None)
    return tree


def _yaml_problem(e: yaml.YAMLError) -> str:
    """Where and what, without PyYAML's multi-line source excerpt and '^' marker."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or not problem:
        return " ".join(str(e).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and cmark is not None:
        where += f" ({context} at line {cmark.line + 1}, column {cmark.column + 1})"
    return where + "; fix the syntax there"


def load_config(path: str | Path, overrides: list[str] = ()) -> DistillConfig:
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DistillError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(tree, dict):
        raise DistillError(f"{path}: expected a mapping of sections at the top level")
    return config_from_dict(apply_overrides(tree, list(overrides)), source=str(path))


def config_from_dict(tree: dict, source: str = "config") -> DistillConfig:
    try:
        cfg = DistillConfig.model_validate(tree)
    except ValidationError as e:
        raise DistillError(f"{source}: {_format_errors(e)}") from None
    try:
        _check_extra_losses(cfg.train.extra_losses, {t.name: t.features for t in cfg.teachers})
    except DistillError as e:
        raise DistillError(f"{source}: {e}") from None
    return cfg
