"""The teacher fingerprint, hashed and cached: how long a run waits before deploying anything.

A dir shaped like a sharded hub checkpoint (config.json, model-0000N-of-0000M.safetensors of
random bytes, tokenizer.json) is fingerprinted three ways side by side:
- uncached: DISTILL_FINGERPRINT_CACHE=0, every byte read and hashed (what every run, resume and
  replica did before orchestrator/file_hashes.py);
- the first call with the cache (hashes, then stores the digest);
- a second process with the same cache (a re-run, a resume, a replica on the same node);
and two teachers uncached, one after the other and on two threads (prepare.teacher_identities).
The bytes come from the page cache after the first read, so the hashing rate is the CPU's;
from disk or network storage the uncached time is bounded by the read rate instead.

    python -m benchmarks.fingerprint_cache [--gib 4] [--shards 4]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARM = "from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "  # check_teacher_files' import, untimed
CALL = (f"import json, sys, time; {WARM}from orchestrator.models import teacher_fingerprint; t = time.perf_counter(); "
        "fp = teacher_fingerprint(json.loads(sys.argv[1])); print(json.dumps([fp, time.perf_counter() - t]))")
# Two teachers, uncached: one after the other (as before), then as prepare.teacher_identities does (threads).
TWO = (f"import json, sys, time; {WARM}from concurrent.futures import ThreadPoolExecutor; "
       "from orchestrator.models import teacher_fingerprint; cfg = json.loads(sys.argv[1]); t = time.perf_counter(); "
       "[teacher_fingerprint(cfg) for _ in range(2)]; seq = time.perf_counter() - t; t = time.perf_counter(); "
       "list(ThreadPoolExecutor(2).map(teacher_fingerprint, [cfg, cfg])); "
       "print(json.dumps([seq, time.perf_counter() - t]))")


def fingerprint_in_a_process(cfg: dict, env: dict, code: str = CALL) -> tuple:
    out = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], env=env, capture_output=True, text=True,
                         check=True)
    fp, took = json.loads(out.stdout.strip().splitlines()[-1])
    return fp, took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results_fingerprint_cache.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fingerprint_"))
    try:
        d = root / "teacher"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (d / "tokenizer.json").write_text("{}")
        per = int(args.gib * 2**30 / args.shards)
        for i in range(args.shards):
            with open(d / f"model-{i + 1:05d}-of-{args.shards:05d}.safetensors", "wb") as f:
                for _ in range(per >> 20):
                    f.write(os.urandom(1 << 20))
        time.sleep(2.5)  # past file_hashes.RACY_S: the files are settled
        cfg = {"name": "big", "backend": "hf", "path": str(d)}
        env = {**os.environ, "DISTILL_CACHE_DIR": str(root / "cache")}
        fingerprint_in_a_process(cfg, {**env, "DISTILL_FINGERPRINT_CACHE": "0"})  # warm the page cache
        result = {"gib": round(sum(f.stat().st_size for f in d.iterdir()) / 2**30, 2), "shards": args.shards}
        fp0, result["uncached_s"] = fingerprint_in_a_process(cfg, {**env, "DISTILL_FINGERPRINT_CACHE": "0"})
        fp1, result["first_cached_call_s"] = fingerprint_in_a_process(cfg, env)
        fp2, result["second_process_s"] = fingerprint_in_a_process(cfg, env)
        assert fp0 == fp1 == fp2, (fp0, fp1, fp2)
        result["two_teachers_one_after_the_other_s"], result["two_teachers_on_threads_s"] = \
            fingerprint_in_a_process(cfg, {**env, "DISTILL_FINGERPRINT_CACHE": "0"}, TWO)
        result["hash_rate_gib_s"] = round(result["gib"] / result["uncached_s"], 2)
        result["projected_70b_bf16_uncached_s"] = round(131 / result["hash_rate_gib_s"], 0)  # 70.6e9 params x 2 bytes
        result = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
