"""Checkpoint dtypes at a real size: a ~100M Qwen2-shaped model (vocabulary 151,936, tied head,
random weights from a config) saved in bfloat16, as hub checkpoints are.

1. As an `hf` teacher on the CPU (orchestrator.models.CausalLMTeacher) it runs in float32, as
   documented (transformers 5 would keep bfloat16 if not told): its dtype and labeling time.
2. As a student (`init: pretrained`), `student.export_dtype: auto` resolves to the checkpoint's
   bfloat16 (orchestrator.training.export_dtype); a float32 state (the checkpoint plus a little noise,
   as a trained state is off the bfloat16 grid) exported that way:
   the file sizes of float32 and bfloat16 exports, and the largest logit difference between the
   two reloaded models over the same windows.

    python -m benchmarks.scale_export_dtype [--len 256] [--rows 2]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results_scale_export_dtype.json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from orchestrator.config import config_from_dict
    from orchestrator.models import CausalLMTeacher
    from orchestrator.students import build_lm_student, export_student
    from orchestrator.training import export_dtype

    root = Path(tempfile.mkdtemp(prefix="export_dtype_"))
    try:
        cfg = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 512, "intermediate_size": 1536,
               "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
               "max_position_embeddings": 1024, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
        torch.manual_seed(0)
        build_lm_student({"init": "scratch", "config": cfg}).to(torch.bfloat16).save_pretrained(str(root / "hub"))
        vocab = {f"t{i}": i for i in range(151936)}  # a word-level stand-in: export needs a tokenizer dir
        PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                eos_token="t2").save_pretrained(str(root / "tok"))
        windows = np.random.default_rng(0).integers(3, 151643, (args.rows, args.len))
        result = {"vocab_size": 151936, "windows": [args.rows, args.len]}

        t0 = time.perf_counter()
        teacher = CausalLMTeacher({"name": "hub", "backend": "hf", "path": str(root / "hub")}, k=8)
        teacher(windows)
        result["teacher_dtype_on_cpu"] = str(teacher.model.dtype)
        result["teacher_load_and_label_s"] = round(time.perf_counter() - t0, 2)
        result["params"] = sum(p.numel() for p in teacher.model.parameters())
        del teacher

        run = config_from_dict({"task": "lm", "dataset": {"source": "x.parquet"},
                                "teachers": [{"name": "hub", "backend": "hf", "path": str(root / "hub")}],
                                "student": {"init": "pretrained", "path": str(root / "hub")}})
        result["export_dtype_auto"] = export_dtype(run)
        spec = {"init": "pretrained", "path": str(root / "hub")}
        # float32, as training leaves it: the checkpoint moved off the bfloat16 grid by a little noise
        # (a trained state is not bfloat16-exact; the checkpoint itself would round-trip exactly)
        g = torch.Generator().manual_seed(1)
        state = {k: v + 1e-3 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1
                 else v for k, v in build_lm_student(spec).state_dict().items()}
        x = torch.from_numpy(windows)
        logits = {}
        for dtype in ("float32", result["export_dtype_auto"]):
            t0 = time.perf_counter()
            out = export_student(state, spec, root / dtype, root / "tok", dtype=dtype)
            result[f"export_{dtype}_s"] = round(time.perf_counter() - t0, 2)
            result[f"export_{dtype}_mib"] = round((out / "model.safetensors").stat().st_size / 2**20, 1)
            model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
            result[f"reloaded_{dtype}_dtype"] = str(model.dtype)
            with torch.no_grad():
                logits[dtype] = model.float()(input_ids=x).logits
        diff = (logits["float32"] - logits[result["export_dtype_auto"]]).abs()
        result["max_abs_logit_diff"], result["mean_abs_logit_diff"] = diff.max().item(), diff.mean().item()
        result["top1_agreement"] = (logits["float32"].argmax(-1) == logits[result["export_dtype_auto"]].argmax(-1)) \
            .float().mean().item()
        assert result["teacher_dtype_on_cpu"] == "torch.float32" and result["export_dtype_auto"] == "bfloat16"
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
