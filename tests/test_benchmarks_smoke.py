"""Smoke test of the benchmark suite: `python -m benchmarks.run --quick` runs end to end and
writes its numbers. No timing thresholds: throughput depends on the machine and its load."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What results.json must always hold: each benchmark's headline numbers.
RATIOS = ("label_vs_direct", "label_vs_direct_with_startup", "label_replicas_2_vs_1", "kd_vs_hard_train",
          "kd_vs_kd_alpha1_train", "train_workers_2_vs_1", "store_write_vs_pyarrow", "store_read_vs_pyarrow",
          "bytes_per_token_k32_vs_v1", "bytes_per_token_k32_vs_v2",
          # live configuration choices, side by side: label.executor, train.read_in_driver_mb
          "label_driver_vs_ray_data", "label_vs_direct_ray_data", "train_read_driver_vs_streamed")
FIGURES = (*(f"bytes_per_token_k{k}" for k in (8, 16, 32, 64)), *(f"codec_mean_kl_nats_k{k}" for k in (8, 16, 32, 64)),
           "store_read_checksum_share", "store_codec_decode_ms", "distillkit_bytes_per_token_k50",
           "label_pipeline_rows_per_s", "label_direct_rows_per_s", "train_kd_samples_per_s",
           "train_hard_only_samples_per_s", "label_startup_s", "label_wall_s")


# extended (not in the default run, see pyproject.toml): ~7.5 min on 2 busy cores, most of it
# the label and train benchmarks' Ray Serve and Ray Train start-ups; run it before updating the
# numbers: python -m pytest -m extended tests/test_benchmarks_smoke.py
@pytest.mark.slow
@pytest.mark.extended
def test_quick_run_writes_results_and_numbers_table(tmp_path):
    out = tmp_path / "bench"
    own = [ROOT / "benchmarks" / n for n in ("results.json", "results_detail.json", "results.md", "profile_label.txt")]
    before = {p: p.stat().st_mtime_ns for p in own if p.exists()}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--repeats", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=870)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"ratios", "figures"}
    for kind, names in (("ratios", RATIOS), ("figures", FIGURES)):
        missing = [n for n in names if n not in results[kind]]
        assert not missing, f"{kind} missing {missing}"
    # bench_kd_loss names its numbers by vocabulary size (8k/16k quick, 49k/152k full): each case, each size.
    for case in ("ce", "unchunked", "chunk1024", "chunk256"):
        for what in ("peak_mib", "tokens_per_s"):
            assert sum(n.startswith(f"kd_loss_{what}_{case}_v") for n in results["figures"]) == 2, (case, what)
    for kind in ("ratios", "figures"):
        for name, value in results[kind].items():
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (kind, name, value)
    table = (out / "results.md").read_text()
    for name in (*RATIOS, *FIGURES):
        assert f"| `{name}` |" in table
    assert (out / "profile_label.txt").stat().st_size > 0
    # --out leaves the repository's own files untouched.
    assert {p: p.stat().st_mtime_ns for p in own if p.exists()} == before


def test_scale_lm_online_runs_every_phase_at_tiny_size(tmp_path):
    """benchmarks/scale_lm_online.py (its numbers are taken at ~100M parameters by hand, see
    BENCHMARKS.md) at smoke size, in a child process: every phase runs and reports its numbers."""
    out = tmp_path / "online.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale_lm_online", "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT "))
    figures = json.loads(line[len("BENCH_RESULT "):])["figures"]
    assert json.loads(out.read_text()) == figures
    for phase in ("on_policy_step0", "on_policy_step1", "on_policy_step2", "sample_eval_decode", "sample_eval_score", "generate_decode",
                  "generate_cross_score"):
        for what in ("s", "peak_rss_gib", "tokens", "tokens_per_s"):
            assert figures[f"{phase}_{what}"] > 0, (phase, what)
    # --tiny: 2 prompts, at most 8 new tokens each (an end token may end a sample early)
    assert 0 < figures["generate_decode_tokens"] <= 2 * 8
    assert figures["on_policy_step0_tokens"] <= 2 * 8 and math.isfinite(figures["teacher_nll_of_samples"])
    assert figures["generate_part_rows"] == 2
    for a, b in (("cross_score_big_chunked", "cross_score_big_unchunked"),):  # same scores, chunked or not
        assert figures[f"{a}_nll_sum"] == pytest.approx(figures[f"{b}_nll_sum"], rel=1e-5)


def test_scale_fsdp_runs_every_phase_at_tiny_size(tmp_path):
    """benchmarks/scale_fsdp.py (its numbers are taken at ~100M parameters by hand, see BENCHMARKS.md)
    at smoke size: two spawned gloo ranks run every phase under ddp and fsdp; FSDP holds a shard of
    the weights, and the same weights and batch give the same loss under both wrappers (ddp through
    the fused head, fsdp through the full logits), also after optimiser steps and with the hint term."""
    out = tmp_path / "fsdp.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale_fsdp", "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT "))
    result = json.loads(line[len("BENCH_RESULT "):])
    assert json.loads(out.read_text()) == result
    f = result["figures"]
    for rank in (0, 1):
        for strategy in ("ddp", "fsdp"):
            p = f"rank{rank}_{strategy}_"
            for phase in ("build", "train_step0", "sample", "hint_step0"):
                assert f[f"{p}{phase}_s"] > 0 and f[f"{p}{phase}_peak_rss_gib"] > 0, (p, phase)
            assert 0 < f[f"{p}sample_tokens"] <= 2 * 4  # --tiny: 2 prompts, at most 4 new tokens
            assert math.isfinite(f[f"{p}hint_term"]) and f[f"{p}hint_term"] > 0
        assert f[f"rank{rank}_ddp_build_params_held"] == f["params"]
        assert f[f"rank{rank}_fsdp_build_params_held"] < f["params"]  # a shard
        assert f[f"rank{rank}_ddp_build_fused_head"] and not f[f"rank{rank}_fsdp_build_fused_head"]
        for step in ("train_step0", "hint_step0"):
            assert f[f"rank{rank}_fsdp_{step}_loss"] == pytest.approx(f[f"rank{rank}_ddp_{step}_loss"], rel=1e-3), step
    assert len(result["ratios"]) == 2 * 6 and all(v > 0 for v in result["ratios"].values())


def test_top_p_cost_runs_at_tiny_size(tmp_path):
    """benchmarks/top_p_cost.py (its numbers are taken at vocab 49,152 and 151,936 by hand, see
    BENCHMARKS.md) at smoke size: the top-k-first cut is the full sort's on every shape, and the
    peaked rows take the top-k path while the flat ones are sorted whole."""
    out = tmp_path / "top_p.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.top_p_cost", "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    f = json.loads(out.read_text())["figures"]
    p = "v4096_b2_"
    assert f[p + "decode_step_ms"] > 0
    for shape in ("zipf1.0", "zipf1.5", "flat"):
        assert f[p + shape + "_same"] is True, shape
        assert f[p + shape + "_topk_first_ms"] > 0 and f[p + shape + "_full_sort_ms"] > 0
    assert f[p + "zipf1.5_rows_sorted_whole"] == 0.0 and f[p + "flat_rows_sorted_whole"] == 1.0


def test_scale_vllm_sampler_runs_at_tiny_size(tmp_path):
    """benchmarks/scale_vllm_sampler.py (numbers taken at ~100M by hand, BENCHMARKS.md) at smoke size,
    in a child process: both samplers run, and greedy they agree (a tiny model has no near-ties)."""
    out = tmp_path / "sampler.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale_vllm_sampler", "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT "))
    figures = json.loads(line[len("BENCH_RESULT "):])["figures"]
    assert json.loads(out.read_text()) == figures
    for tag in ("hf_sampled", "hf_greedy", "vllm_sampled", "vllm_greedy"):
        assert figures[f"{tag}_s"] > 0 and figures[f"{tag}_tokens"] > 0, tag
    assert figures["vllm_build_s"] > 0 and figures["vllm_sync_s"] > 0
    assert figures["greedy_same_share"] == 1.0
