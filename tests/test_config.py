"""Config loading: defaults, YAML files, overrides, and one-line errors naming the field path."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from orchestrator.config import DistillConfig, apply_overrides, config_from_dict, load_config
from orchestrator.errors import DistillError

MINIMAL = {
    "dataset": {"source": "sklearn:digits"},
    "teachers": [{"name": "a", "backend": "torch", "path": "x.pt"}],
}


def minimal(**sections) -> dict:
    """A deep copy of MINIMAL with whole sections replaced or added."""
    tree = copy.deepcopy(MINIMAL)
    tree.update(copy.deepcopy(sections))
    return tree


def error_of(tree: dict) -> str:
    """The DistillError message config_from_dict raises for `tree` (fails if it loads)."""
    with pytest.raises(DistillError) as info:
        config_from_dict(tree)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def write(tmp_path: Path, tree, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


# ---- defaults and derived locations ---------------------------------------------------------


def test_minimal_config_gets_documented_defaults():
    cfg = config_from_dict(minimal())
    assert isinstance(cfg, DistillConfig)
    assert cfg.run.name == "run"
    assert cfg.output_dir == "runs"
    d = cfg.dataset
    assert (d.source, d.features, d.label, d.id_column) == ("sklearn:digits", "features", "label", None)
    assert (d.test_fraction, d.seed, d.limit) == (0.3, 0, None)
    (t,) = cfg.teachers
    assert (t.name, t.backend, t.path, t.module, t.kwargs) == ("a", "torch", "x.pt", None, {})
    assert (t.weight, t.replicas, t.num_cpus, t.num_gpus) == (1.0, 1, 0.5, 0)
    assert (t.max_batch_size, t.batch_wait_timeout_s) == (256, 0.005)
    assert (t.resources, t.serve_app) == ({}, None)
    assert (t.health_check_period_s, t.health_check_timeout_s, t.engine) == (5.0, 30.0, None)
    assert cfg.ensemble.model_dump() == {"mode": "mean_prob", "temperature": 4.0, "tau": 1.0}
    assert cfg.store.model_dump() == {"path": None, "shard_size": 256}
    assert cfg.label.model_dump() == {"executor": "auto", "concurrency": 2, "num_cpus": 0.25}
    assert cfg.student.model_dump() == {"arch": "mlp", "hidden": [32], "init": "scratch", "config": None, "path": None,
                                        "teacher": None, "layers": None, "tokenizer": None, "export_dtype": "auto"}
    assert cfg.train.model_dump() == {
        "workers": 2, "cpus_per_worker": 1, "use_gpu": False, "epochs": 20, "batch_size": 64,
        "lr": 3e-3, "weight_decay": 0.0, "loss": "kd", "alpha": 0.1, "beta": 0.5,
        "max_failures": 0, "max_samples": None, "seed": 0, "cache_rows": 200_000, "read_in_driver_mb": 256, "worker_resources": {},
        "schedule": "constant", "warmup_steps": 0, "min_lr_ratio": 0.1, "grad_clip": None, "grad_accum": 1, "max_steps": None,
        "checkpoint_every": None, "strategy": "ddp", "gradient_checkpointing": False, "extra_losses": [], "on_policy": None,
    }
    assert cfg.eval.baseline is True
    assert cfg.ray.model_dump() == {"address": None, "num_cpus": None}


def test_defaults_are_not_shared_between_configs():
    a = config_from_dict(minimal())
    b = config_from_dict(minimal())
    a.teachers[0].kwargs["x"] = 1
    a.student.hidden.append(8)
    assert b.teachers[0].kwargs == {}
    assert b.student.hidden == [32]


def test_run_dir_and_default_store_path():
    cfg = config_from_dict(minimal(run={"name": "exp1"}, output_dir="out"))
    assert cfg.run_dir == Path("out") / "exp1"
    assert cfg.store_path == str(Path("out") / "exp1" / "store")


def test_explicit_store_path_wins():
    cfg = config_from_dict(minimal(store={"path": "s3://bucket/labels"}))
    assert cfg.store_path == "s3://bucket/labels"
    assert cfg.run_dir == Path("runs") / "run"


# ---- files ----------------------------------------------------------------------------------


def test_load_config_from_yaml_file(tmp_path):
    path = write(tmp_path, minimal(train={"epochs": 5, "loss": "jsd"}, ensemble={"mode": "ca_mkd"}))
    cfg = load_config(path)
    assert cfg.train.epochs == 5
    assert cfg.train.loss == "jsd"
    assert cfg.ensemble.mode == "ca_mkd"
    assert cfg.train.batch_size == 64  # untouched defaults still apply


def test_load_config_accepts_str_path(tmp_path):
    assert load_config(str(write(tmp_path, minimal()))).teachers[0].name == "a"


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(DistillError) as info:
        load_config(path)
    assert str(info.value) == f"config file not found: {path}"


def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: {source: [unclosed\nteachers:\n  - name: a\n")
    with pytest.raises(DistillError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: not valid YAML: ")
    assert "\n" not in msg


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, ["dataset", "teachers"])
    with pytest.raises(DistillError, match="expected a mapping of sections at the top level"):
        load_config(path)


def test_empty_file_reports_missing_required_sections(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(DistillError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ")
    assert "dataset: required field is missing" in msg
    assert "teachers: required field is missing" in msg


def test_file_errors_are_prefixed_with_the_file(tmp_path):
    path = write(tmp_path, minimal(train={"epochs": 0}))
    with pytest.raises(DistillError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: train.epochs: ")


# ---- overrides ------------------------------------------------------------------------------


def test_overrides_are_yaml_typed(tmp_path):
    path = write(tmp_path, minimal())
    cfg = load_config(path, ["train.epochs=3", "teachers.0.weight=2.5", "ensemble.mode=entropy",
                             "train.use_gpu=true", "student.hidden=[8, 4]", "run.name=exp2"])
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.teachers[0].weight == 2.5
    assert cfg.ensemble.mode == "entropy"
    assert cfg.train.use_gpu is True
    assert cfg.student.hidden == [8, 4]
    assert cfg.run_dir == Path("runs") / "exp2"


def test_override_beats_file_value(tmp_path):
    path = write(tmp_path, minimal(train={"epochs": 7, "lr": 0.1}))
    cfg = load_config(path, ["train.epochs=9"])
    assert (cfg.train.epochs, cfg.train.lr) == (9, 0.1)


def test_override_creates_missing_section():
    tree = apply_overrides(minimal(), ["store.shard_size=64"])
    assert tree["store"] == {"shard_size": 64}


def test_override_value_may_contain_equals_sign():
    tree = apply_overrides(minimal(), ["ray.address=ray://head:10001?a=b"])
    assert tree["ray"]["address"] == "ray://head:10001?a=b"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("teachers.5.weight=2", "override 'teachers.5.weight': no item 5 in teachers"),
        ("teachers.x.weight=2", "override 'teachers.x.weight': no item x in teachers"),
        ("teachers.3=1", "override 'teachers.3': no item 3"),
        ("train.epochs", "override 'train.epochs': expected section.key=value"),
        ("=3", "override '=3': expected section.key=value"),
    ],
)
def test_bad_override_path(override, expected):
    with pytest.raises(DistillError) as info:
        apply_overrides(minimal(), [override])
    assert str(info.value) == expected


def test_override_through_a_scalar_is_refused(tmp_path):
    path = write(tmp_path, minimal(train={"epochs": 4}))
    with pytest.raises(DistillError) as info:
        load_config(path, ["train.epochs.max=3"])
    assert str(info.value) == "override 'train.epochs.max': train.epochs is not a section"


def test_override_to_unknown_key_is_reported_by_validation(tmp_path):
    path = write(tmp_path, minimal())
    with pytest.raises(DistillError) as info:
        load_config(path, ["train.epoch=3"])
    assert str(info.value) == f"{path}: train.epoch: unknown key (check the spelling)"


# ---- validation errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "tree, path",
    [
        (minimal(trian={"epochs": 3}), "trian"),
        (minimal(ensemble={"mdoe": "entropy"}), "ensemble.mdoe"),
        (minimal(teachers=[{"name": "a", "backend": "torch", "path": "x.pt", "wieght": 2}]), "teachers.0.wieght"),
    ],
)
def test_unknown_key_names_the_dotted_path(tree, path):
    assert error_of(tree) == f"config: {path}: unknown key (check the spelling)"


@pytest.mark.parametrize(
    "tree, path, words",
    [
        (minimal(train={"epochs": "ten"}), "train.epochs", ["valid integer", "(got 'ten')"]),
        (minimal(store={"shard_size": 0}), "store.shard_size", ["greater than or equal to 1", "(got 0)"]),
        (minimal(train={"workers": -1}), "train.workers", ["greater than or equal to 1", "(got -1)"]),
        (minimal(dataset={"source": "x.csv", "test_fraction": 1.0}), "dataset.test_fraction", ["less than 1"]),
        (minimal(run={"name": "a b"}), "run.name", ["pattern"]),
    ],
)
def test_bad_values_name_the_field(tree, path, words):
    msg = error_of(tree)
    assert msg.startswith(f"config: {path}: ")
    for w in words:
        assert w in msg


@pytest.mark.parametrize(
    "tree, path, allowed",
    [
        (minimal(teachers=[{"name": "a", "backend": "onnx", "path": "x.pt"}]), "teachers.0.backend",
         ["'torch'", "'hf'"]),
        (minimal(ensemble={"mode": "median"}), "ensemble.mode",
         ["'mean_prob'", "'mean_logit'", "'entropy'", "'best_teacher'", "'ca_mkd'"]),
        (minimal(train={"loss": "mse"}), "train.loss", ["'kd'", "'forward_kl'", "'reverse_kl'", "'jsd'"]),
    ],
)
def test_unknown_choice_lists_allowed_values(tree, path, allowed):
    msg = error_of(tree)
    assert msg.startswith(f"config: {path}: ")
    for value in allowed:
        assert value in msg
    assert "(got '" in msg


def test_several_errors_are_joined_on_one_line():
    msg = error_of(minimal(train={"epochs": 0, "loss": "mse"}, store={"shard_size": -5}))
    assert "train.epochs: " in msg and "train.loss: " in msg and "store.shard_size: " in msg
    assert msg.count("; ") == 2


def test_missing_required_fields():
    assert error_of({"teachers": MINIMAL["teachers"]}) == "config: dataset: required field is missing"
    assert error_of({"dataset": MINIMAL["dataset"], "teachers": [{"name": "a", "backend": "torch"}]}) == \
        "config: teachers.0.path: required field is missing"


def test_teachers_must_not_be_empty():
    assert error_of(minimal(teachers=[])).startswith("config: teachers: List should have at least 1 item")


def test_duplicate_teacher_names():
    t = MINIMAL["teachers"][0]
    msg = error_of(minimal(teachers=[t, {**t, "path": "y.pt"}, {**t, "name": "b"}]))
    assert "teacher names must be unique, repeated: a" in msg


def test_duplicate_teacher_names_message_is_short_and_names_teachers():
    t = MINIMAL["teachers"][0]
    msg = error_of(minimal(teachers=[t, t]))
    assert msg == "config: teachers: teacher names must be unique, repeated: a"


def test_all_zero_teacher_weights_refused():
    msg = error_of(minimal(teachers=[{"name": "a", "backend": "torch", "path": "x.pt", "weight": 0}]))
    assert "at least one teacher needs weight > 0" in msg


def test_student_hidden_sizes_must_be_positive():
    msg = error_of(minimal(student={"hidden": [8, 0]}))
    assert msg.startswith("config: student: hidden sizes must be > 0, got [8, 0]")


def test_module_must_look_like_pkg_colon_class():
    tree = minimal(teachers=[{"name": "a", "backend": "torch", "path": "x.pt", "module": "pkg.mod.Class"}])
    assert error_of(tree).startswith("config: teachers.0.module: ")
    tree["teachers"][0]["module"] = "pkg.mod:Class"
    assert config_from_dict(tree).teachers[0].module == "pkg.mod:Class"


def test_validate_assignment_is_on():
    cfg = config_from_dict(minimal())
    with pytest.raises(ValidationError):
        cfg.train.epochs = 0
    assert cfg.train.epochs == 20


def test_distill_error_is_always_one_line():
    err = DistillError("bad value\n  in   line two\tand three")
    assert str(err) == "bad value in line two and three"
    assert err.exit_code == 2


def test_keys_the_task_never_reads_are_refused_by_name():
    # Classification reads neither lm.* nor the text column: before, both were silently dropped.
    assert error_of(minimal(lm={"k": 4})) == ("config: config: lm.k: not used by task classification; "
                                              "remove it, or set the task that uses it")
    msg = error_of(minimal(dataset={**MINIMAL["dataset"], "text": "body"}, lm={"max_len": 64, "k": 4}))
    assert msg.startswith("config: config: dataset.text: not used by task classification (nor lm.k, lm.max_len)")
    lm = {"task": "lm", "dataset": {"source": "t.parquet", "label": "y"}, "lm": {"student_config": "s.json"},
          "teachers": [{"name": "a", "backend": "hf", "path": "x"}], "student": {"hidden": [8]}}
    assert "dataset.label: not used by task lm (nor student.hidden)" in error_of(lm)
    # Defaults never count, only what the config sets: a dumped config (all defaults written) loads.
    assert config_from_dict({**lm, "dataset": {"source": "t.parquet"}, "student": {}}).task == "lm"
    dumped = config_from_dict({**lm, "dataset": {"source": "t.parquet"}, "student": {}}).model_dump(mode="json")
    assert config_from_dict(dumped).task == "lm"


def _lm(**student):
    return {"task": "lm", "dataset": {"source": "t.parquet"}, "student": student,
            "teachers": [{"name": "big", "backend": "hf", "path": "x"}, {"name": "small", "backend": "hf", "path": "y"}]}


def test_lm_student_sources():
    assert config_from_dict(_lm(config="s.json")).student_spec_source == {"init": "scratch", "config_file": "s.json"}
    assert config_from_dict(_lm(init="pretrained", path="p")).student_spec_source == {"init": "pretrained", "path": str(Path("p").resolve())}
    cfg = config_from_dict(_lm(init="teacher", teacher="big", layers=[0, 2]))
    assert cfg.student_spec_source == {"init": "teacher", "path": str(Path("x").resolve()), "layers": [0, 2]}
    assert error_of(_lm()).endswith("student.config: required for task lm with student.init scratch (an HF config.json; "
                                    "or start from student.init pretrained / teacher)")
    assert "student.path: required with student.init pretrained" in error_of(_lm(init="pretrained"))
    assert "student.teacher: no teacher named 'huge' (teachers: big, small)" in error_of(
        _lm(init="teacher", teacher="huge", layers=[0]))
    assert "student.layers: required with student.init teacher" in error_of(_lm(init="teacher", teacher="big"))
    assert "student.path: not used with student.init teacher" in error_of(
        _lm(init="teacher", teacher="big", layers=[0], path="p"))
    assert "student.init: not used by task classification" in error_of(minimal(student={"init": "teacher"}))


def _lm_teacher(**kv) -> dict:
    return minimal(task="lm", lm={"student_config": "s.json"},
                   teachers=[{"name": "v", "backend": "vllm", "path": "d", **kv}])


def test_engine_keys_and_their_unset_defaults():
    (t,) = config_from_dict(_lm_teacher(engine={"dtype": "bfloat16", "max_model_len": 4096})).teachers
    assert t.engine.model_dump() == {"dtype": "bfloat16", "gpu_memory_utilization": None, "max_model_len": 4096,
                                     "tensor_parallel_size": 1, "enforce_eager": None, "kv_cache_gib": None,
                                     "max_num_seqs": None}  # None: decided by platform in the replica


@pytest.mark.parametrize(
    "tree, expected",
    [
        (minimal(teachers=[{"name": "a", "backend": "torch", "path": "x.pt", "engine": {"dtype": "float16"}}]),
         "teachers.0: engine: vLLM engine settings apply to backend vllm only (teacher 'a' is torch); remove engine"),
        (_lm_teacher(engine={"tensor_parallel_size": 0}),
         "teachers.0.engine.tensor_parallel_size: Input should be greater than or equal to 1 (got 0)"),
        (_lm_teacher(engine={"tensor_parallel_size": 2}, num_gpus=1),
         "teachers.0: engine.tensor_parallel_size: 2 shards need num_gpus: 2 (one GPU each) on teacher 'v' (got num_gpus: 1)"),
        (_lm_teacher(engine={"gpu_memory_utilization": 1.5}),
         "teachers.0.engine.gpu_memory_utilization: Input should be less than or equal to 1 (got 1.5)"),
        (_lm_teacher(engine={"dtype": "fp8"}),
         "teachers.0.engine.dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16' (got 'fp8')"),
        (_lm_teacher(engine={"gpu_mem": 0.5}), "teachers.0.engine.gpu_mem: unknown key (check the spelling)"),
        (_lm_teacher(health_check_timeout_s=0), "teachers.0.health_check_timeout_s: Input should be greater than 0 (got 0)"),
        (_lm_teacher(backend="hf", num_gpus=2),
         "teachers.0: num_gpus: teacher 'v' (backend hf) runs on one GPU of its replica (it asks 2, the rest would "
         "sit idle); use num_gpus <= 1 (replicas for more throughput), or backend vllm with engine.tensor_parallel_size "
         "for a model larger than a GPU"),
    ],
    ids=["engine-on-torch", "tp-below-1", "tp-without-gpus", "memory-fraction-above-1", "unknown-dtype", "unknown-engine-key",
         "health-timeout-0", "hf-teacher-on-two-gpus"],
)
def test_engine_and_health_check_errors(tree, expected):
    assert error_of(tree) == f"config: {expected}"


def test_export_dtype_follows_the_checkpoint_the_student_started_from(tmp_path):
    from orchestrator.training import export_dtype

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    lm = {"task": "lm", "teachers": [{"name": "t", "backend": "hf", "path": str(tmp_path)}]}
    assert export_dtype(config_from_dict(minimal(**lm, lm={"student_config": "s.json"}))) == "float32"  # scratch
    pretrained = minimal(**lm, student={"init": "pretrained", "path": str(tmp_path)})
    assert export_dtype(config_from_dict(pretrained)) == "bfloat16"
    assert export_dtype(config_from_dict({**pretrained, "student": {**pretrained["student"], "export_dtype": "float32"}})) \
        == "float32"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float16"}))  # transformers 4
    assert export_dtype(config_from_dict(minimal(**lm, student={"init": "teacher", "teacher": "t", "layers": [0]}))) \
        == "float16"
    assert "student.export_dtype: not used by task classification" in error_of(minimal(student={"export_dtype": "bfloat16"}))
