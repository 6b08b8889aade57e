"""What a teacher's config turns into, without running it: vLLM engine arguments by platform,
Serve deployment options (health checks, tensor-parallel placement groups), and fingerprints.

Pure: no Ray cluster, no vLLM engine. The GPU branches are checked as the arguments and options
they produce; running them needs GPUs, which this machine does not have.
"""
from __future__ import annotations

import json

import pytest

from actors.teacher import build_app
from orchestrator.config import TeacherConfig
from orchestrator.models import teacher_fingerprint
from orchestrator.vllm_teacher import engine_args


def _vllm(**kv) -> dict:
    return TeacherConfig.model_validate({"name": "v", "backend": "vllm", "path": "d", **kv}).model_dump()


def test_cpu_defaults():
    args, why = engine_args(_vllm(), on_gpu=False, max_model_len=512)
    assert args == {"tensor_parallel_size": 1, "dtype": "float32", "enforce_eager": True,
                    "kv_cache_memory_bytes": 1 << 30, "max_model_len": 512}
    assert "kv_cache_gib=1 (CPU default)" in why and "gpu_memory_utilization unset (CPU: unused, KV cache is kv_cache_gib)" in why


def test_gpu_defaults_size_memory_for_the_replicas_sharing_a_gpu():
    args, why = engine_args(_vllm(num_gpus=1), on_gpu=True, max_model_len=512)
    assert args == {"tensor_parallel_size": 1, "dtype": "auto", "enforce_eager": False,
                    "gpu_memory_utilization": 0.9, "max_model_len": 512}
    assert "dtype=auto (GPU: the checkpoint's dtype)" in why and "enforce_eager=False (GPU: CUDA graphs)" in why
    # num_gpus 0.25: four replicas per GPU, 0.9 / 4 each.
    args, why = engine_args(_vllm(num_gpus=0.25), on_gpu=True, max_model_len=512)
    assert args["gpu_memory_utilization"] == 0.225
    assert "gpu_memory_utilization=0.225 (GPU: 0.9 x this replica's share of its GPU (0.25))" in why


def test_set_keys_win_and_say_so():
    engine = {"dtype": "bfloat16", "enforce_eager": True, "gpu_memory_utilization": 0.5, "max_model_len": 128,
              "kv_cache_gib": 2, "max_num_seqs": 16}
    args, why = engine_args(_vllm(num_gpus=1, engine=engine), on_gpu=True, max_model_len=512)
    assert args == {"tensor_parallel_size": 1, "dtype": "bfloat16", "enforce_eager": True, "gpu_memory_utilization": 0.5,
                    "max_model_len": 128, "kv_cache_memory_bytes": 2 << 30, "max_num_seqs": 16}
    for key in engine:
        assert f"{key}={engine[key]} (teachers[].engine.{key})" in why


def test_tensor_parallel_uses_ray_workers():
    args, _ = engine_args(_vllm(num_gpus=4, engine={"tensor_parallel_size": 4}), on_gpu=True, max_model_len=512)
    assert args["tensor_parallel_size"] == 4 and args["distributed_executor_backend"] == "ray"
    assert args["gpu_memory_utilization"] == 0.9  # each shard has a whole GPU


def test_tensor_parallel_deployment_gets_one_gpu_bundle_per_shard():
    """engine.tensor_parallel_size 4 -> a STRICT_PACK placement group of 4 GPU bundles per replica.

    Checked on the built Serve application's options only: starting it needs 4 GPUs on one node,
    which this machine (CPU only) does not have.
    """
    app = build_app({"name": "big", "backend": "vllm", "path": "d", "num_cpus": 2, "num_gpus": 4, "replicas": 2,
                     "resources": {"teacher_node": 1}, "engine": {"tensor_parallel_size": 4}, "task": "lm"})
    deployment = app._bound_deployment  # Serve's Application has no public accessor for its deployment
    replica = deployment._replica_config
    assert replica.placement_group_bundles == [{"CPU": 2, "GPU": 1, "teacher_node": 1}, {"GPU": 1}, {"GPU": 1}, {"GPU": 1}]
    assert replica.placement_group_strategy == "STRICT_PACK"
    # The replica actor sits in bundle 0 without a GPU: the GPUs are for vLLM's Ray workers.
    assert deployment.ray_actor_options == {"num_cpus": 2, "num_gpus": 0, "resources": {"teacher_node": 1}}
    assert deployment.num_replicas == 2


def test_single_gpu_deployment_has_no_placement_group_and_its_health_check_settings():
    app = build_app({"name": "one", "backend": "vllm", "path": "d", "num_gpus": 1, "task": "lm",
                     "health_check_period_s": 2, "health_check_timeout_s": 120})
    deployment = app._bound_deployment
    assert deployment._replica_config.placement_group_bundles is None
    assert deployment.ray_actor_options["num_gpus"] == 1
    assert (deployment._deployment_config.health_check_period_s, deployment._deployment_config.health_check_timeout_s) == (2, 120)


def test_fingerprint_covers_the_engine_dtype(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10}))
    base = teacher_fingerprint(_vllm(path=str(tmp_path)))
    # Settings that do not change outputs keep the fingerprint (and an unset dtype that of stores labeled before `engine`).
    assert teacher_fingerprint(_vllm(path=str(tmp_path), engine={"max_model_len": 64, "kv_cache_gib": 2})) == base
    bf16 = teacher_fingerprint(_vllm(path=str(tmp_path), engine={"dtype": "bfloat16"}))
    assert bf16 != base and bf16 != teacher_fingerprint(_vllm(path=str(tmp_path), engine={"dtype": "float32"}))


@pytest.mark.parametrize("on_gpu", [False, True])
def test_engine_args_never_pass_unknown_keys(on_gpu):
    """Every argument is one vllm.LLM takes (its EngineArgs fields)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    engine = {"dtype": "float16", "gpu_memory_utilization": 0.5, "max_model_len": 64, "enforce_eager": False,
              "kv_cache_gib": 1, "max_num_seqs": 2, "tensor_parallel_size": 2}
    args, _ = engine_args(_vllm(num_gpus=2, engine=engine), on_gpu=on_gpu, max_model_len=512)
    assert set(args) <= {f.name for f in dataclasses.fields(EngineArgs)}
