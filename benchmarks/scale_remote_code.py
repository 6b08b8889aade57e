"""teachers[].trust_remote_code at a real size: a ~100M Qwen2-shaped teacher (vocabulary 151,936,
random weights from a config), and a copy of it whose config names its own code (auto_map,
model_type tiny_custom: tests.helpers_lm.as_remote_code, as a hub repo with its own modeling file
has it). Both label the same windows through the hf backend (orchestrator.models.CausalLMTeacher), and the copy also through
the vllm backend (its architectures name vLLM's Qwen2, its config class is the dir's code, as for
hub models vLLM implements but transformers does not ship). The top-k are compared (asserted
equal for hf; vLLM's float32 CPU kernels may reorder near-ties, so its top-1 agreement is
reported) and each load and label is timed.

    python -m benchmarks.scale_remote_code [--len 256] [--rows 4] [--no-vllm]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tests.helpers_lm import as_remote_code

def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--out", default="benchmarks/results_scale_remote_code.json")
    args = ap.parse_args()
    from orchestrator.models import load_teacher
    from orchestrator.students import build_lm_student

    k, root = 8, Path(tempfile.mkdtemp(prefix="remote_code_"))
    try:
        torch.manual_seed(0)
        cfg = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 512, "intermediate_size": 1536,
               "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
               "max_position_embeddings": 1024, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
        model = build_lm_student({"init": "scratch", "config": cfg}).eval()
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(str(root / "plain"))
        del model
        windows = np.random.default_rng(0).integers(3, 151643, (args.rows, args.len))
        result = {"params": params, "vocab_size": 151936, "windows": [args.rows, args.len], "k": k}

        plain, result["hf_plain_load_s"] = timed(lambda: load_teacher(
            {"name": "plain", "backend": "hf", "path": str(root / "plain")}, task="lm", k=k))
        (ids, lps), result["hf_plain_label_s"] = timed(lambda: plain(windows))
        del plain
        custom_dir = as_remote_code(root / "plain", root / "custom", family="Qwen2")
        custom, result["hf_own_code_load_s"] = timed(lambda: load_teacher(
            {"name": "custom", "backend": "hf", "path": str(custom_dir), "trust_remote_code": True}, task="lm", k=k))
        result["hf_own_code_class"] = f"{type(custom.model).__module__}.{type(custom.model).__name__}"
        (c_ids, c_lps), result["hf_own_code_label_s"] = timed(lambda: custom(windows))
        del custom
        np.testing.assert_array_equal(c_ids, ids)
        result["hf_max_abs_logprob_diff"] = float(np.abs(c_lps - lps).max())
        print(json.dumps(result, indent=1), flush=True)

        if not args.no_vllm:
            vdir = as_remote_code(root / "plain", root / "custom_vllm", "Qwen2ForCausalLM", family="Qwen2")
            engine = {"max_model_len": args.len + 1, "kv_cache_gib": 1}
            v, result["vllm_own_code_load_s"] = timed(lambda: load_teacher(
                {"name": "v", "backend": "vllm", "path": str(vdir), "trust_remote_code": True, "engine": engine},
                task="lm", k=k))
            result["vllm_config_class"] = type(v.llm.llm_engine.vllm_config.model_config.hf_config).__name__
            (v_ids, v_lps), result["vllm_own_code_label_s"] = timed(lambda: v(windows))
            result["vllm_top1_agreement_with_hf"] = float((v_ids[..., 0] == ids[..., 0]).mean())
            result["vllm_top1_max_abs_logprob_diff"] = float(np.abs(v_lps[..., 0] - lps[..., 0]).max())
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
