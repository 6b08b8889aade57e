"""Teachers with teachers[].num_gpus > 0 run on the GPU Ray gives their replica.

The CUDA cases need a GPU: CI has none, so they are skipped there with that reason (not
mocked). They ran on an H100 device machine, with `pytest --noconftest tests/test_gpu_teachers.py`
(this module needs no Ray): GPU and CPU outputs of the same teacher agree.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from orchestrator.models import CausalLMTeacher, ClassifierTeacher, teacher_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def test_no_gpu_asked_or_none_visible_means_cpu():
    assert teacher_device({"num_gpus": 0}).type == "cpu"
    if not torch.cuda.is_available():  # the driver on a CPU head node evaluates the same teacher
        assert teacher_device({"num_gpus": 1}).type == "cpu"


@needs_cuda
def test_classifier_teacher_on_gpu_matches_cpu(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "mlp.pt"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))), str(path))
    x = np.random.default_rng(0).normal(size=(50, 64)).astype(np.float32)
    cfg = {"name": "mlp", "backend": "torch", "path": str(path)}
    gpu, cpu = ClassifierTeacher({**cfg, "num_gpus": 1}), ClassifierTeacher({**cfg, "num_gpus": 0})
    assert next(gpu.model.parameters()).is_cuda and not next(cpu.model.parameters()).is_cuda
    np.testing.assert_allclose(gpu(x), cpu(x), atol=1e-4)


@needs_cuda
def test_lm_teacher_on_gpu_matches_cpu(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
                     ).save_pretrained(tmp_path)
    cfg = {"name": "llama", "path": str(tmp_path)}
    gpu, cpu = CausalLMTeacher({**cfg, "num_gpus": 1}, k=8), CausalLMTeacher({**cfg, "num_gpus": 0}, k=8)
    assert gpu.model.device.type == "cuda" and cpu.model.device.type == "cpu"
    windows = np.random.default_rng(0).integers(0, 512, size=(4, 32))
    (gi, gl), (ci, cl) = gpu(windows), cpu(windows)
    assert gi.shape == ci.shape == (4, 31, 8) and gi.dtype == np.int32
    np.testing.assert_allclose(gl, cl, atol=1e-3)  # the k largest log-probs, GPU vs CPU
    assert (gi == ci).mean() > 0.95  # ids agree up to near-ties
    np.testing.assert_allclose(gpu.nll(windows), cpu.nll(windows), atol=1e-3)
