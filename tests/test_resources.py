"""orchestrator/resources.py: which stage asks for more CPUs / GPUs than the cluster has (pure;
the refusal on an embedded Ray is in tests/test_bad_input.py)."""
from __future__ import annotations

from orchestrator.config import config_from_dict
from orchestrator.resources import shortfalls, stage_needs


def _cfg(teachers, **train):
    return config_from_dict({"dataset": {"source": "x.parquet"}, "teachers": teachers,
                             "train": {"workers": 2, "cpus_per_worker": 1, **train}})


T = {"backend": "torch", "path": "t.pt"}


def test_offline_stages_take_turns():
    cfg = _cfg([{**T, "name": "a", "num_cpus": 1, "replicas": 2}, {**T, "name": "b", "num_cpus": 0.5, "num_gpus": 1}])
    needs = {s: n for s, (n, _) in stage_needs(cfg).items()}
    assert needs == {"label": {"CPU": 2.5, "GPU": 1.0}, "train": {"CPU": 2.0, "GPU": 0.0},
                     "evaluate": {"CPU": 2.5, "GPU": 1.0}}  # the student task first, then the teachers
    assert shortfalls(cfg, {"CPU": 2.5, "GPU": 1}) == []
    label, evaluate = shortfalls(cfg, {"CPU": 2.0, "GPU": 1})
    assert label == "label holds 2.5 CPU at once (teachers[].replicas x num_cpus / num_gpus) and the cluster has 2"
    assert evaluate.startswith("evaluate holds 2.5 CPU at once (a student task, then teachers[]")
    assert [p.split(" holds")[0] for p in shortfalls(cfg, {"CPU": 2.0})] == ["label", "label", "evaluate", "evaluate"]


def test_on_policy_holds_the_teachers_beside_the_workers_and_the_student_task():
    cfg = config_from_dict({"task": "lm", "dataset": {"source": "x.parquet", "format": "prompt_response"},
                            "teachers": [{"name": "a", "backend": "hf", "path": "d", "num_cpus": 1}],
                            "student": {"init": "teacher", "teacher": "a", "layers": [0]},
                            "train": {"workers": 2, "cpus_per_worker": 0.5, "on_policy": {"fraction": 0.5}}})
    needs = {s: n for s, (n, _) in stage_needs(cfg).items()}
    assert needs["train"] == {"CPU": 2.0, "GPU": 0.0} and needs["evaluate"] == {"CPU": 2.0, "GPU": 0.0}
    assert shortfalls(cfg, {"CPU": 2}) == []
    assert [p.split(" holds")[0] for p in shortfalls(cfg, {"CPU": 1.5})] == ["train", "evaluate"]
    assert "train.on_policy keeps them up" in shortfalls(cfg, {"CPU": 1.5})[0]


def test_attached_teachers_and_gpu_workers():
    cfg = _cfg([{**T, "name": "a", "num_gpus": 4, "serve_app": "elsewhere"}], use_gpu=True)
    needs = {s: n for s, (n, _) in stage_needs(cfg).items()}
    assert needs["label"] == {"CPU": 0.0, "GPU": 0.0}  # served elsewhere: not this cluster's
    assert needs["train"] == {"CPU": 2.0, "GPU": 2.0}
    assert shortfalls(cfg, {"CPU": 8, "GPU": 1})[0].startswith("train holds 2 GPU at once")


def test_ray_data_labelers_count_beside_the_teachers():
    raw = {"dataset": {"source": "x.parquet"}, "teachers": [{**T, "name": "a", "num_cpus": 1}],
           "label": {"executor": "ray_data", "concurrency": 4, "num_cpus": 0.5}}
    needs = {s: n for s, (n, _) in stage_needs(config_from_dict(raw)).items()}
    assert needs["label"] == {"CPU": 3.0, "GPU": 0.0}
    assert "label.concurrency x label.num_cpus" in shortfalls(config_from_dict(raw), {"CPU": 2})[0]
    for executor in ("driver", "auto"):  # the driver's threads hold nothing; auto is ray_data on a cluster only
        cfg = config_from_dict({**raw, "label": {**raw["label"], "executor": executor}})
        assert {s: n for s, (n, _) in stage_needs(cfg).items()}["label"] == {"CPU": 1.0, "GPU": 0.0}
