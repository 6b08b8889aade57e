"""`distill generate CONFIG`: the teachers write responses to the dataset's prompts (sequence-level
KD data), through their Serve deployments, and the result is curated into a dataset to train on.

    prompts   dataset.source, format prompt_response (the response column optional) or chat (the
              conversation up to its last assistant turn, rendered with the generation prompt)
    generate  each teacher, generate.n samples per prompt (orchestrator/generation.py), in blocks
              of generate.block_size prompts; each sample keeps its tokens, whether an end token
              ended it, and its own teacher's top-k log-probs and NLL per generated token
    score     generate.cross_score: every teacher's NLL of every written token (`score` on Serve)
    write     one Parquet part per (teacher, block), tmp + rename: a killed run leaves whole parts
              only, and a re-run skips them, so each (prompt id, teacher, sample index) is written
              exactly once; each sample draws from its own seeded generator, so the same seed
              gives the same tokens whichever run (or batch) wrote it
    curate    orchestrator/curation.py -> OUTPUT/generated.parquet + OUTPUT/generate.json (what
              was generated with what, and how many responses were dropped and why)

Why the output is a dataset in the pipeline's own prompt_response / chat form, and not a label
store of its own: cross-scoring *is* labeling. `distill run` with dataset.source pointed at
generated.parquet labels every kept response with every teacher and ensembles the top-k soft
labels exactly as for any other data, into a normal label store (manifest, fingerprints,
exactly-once shards); one labeling path, not two that could drift apart. The scores taken here
serve curation only. The student's inputs are the response text tokenized again by `distill
run`; for the tokenizers we use that gives back the generated tokens (the decoded text of a
byte-level BPE re-encodes to the same ids in the common case, not in every case).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import metrics
from .config import DistillConfig
from .curation import curate, mixture_nll
from .errors import DistillError
from .models import check_lm_limits, load_tokenizer, tokenizer_hash
from .prepare import check_vocabulary, teacher_identities
from .prompts import Prompt, eos_ids, load_prompts, reference_answers, reference_record

log = logging.getLogger("distill")
TEST_HOOKS_ENV = "DISTILL_TEST_HOOKS"  # TEST ONLY: {"generate_stall_after_parts": N}, see _test_hook


def generate(cfg: DistillConfig, quiet: bool = False) -> dict:
    g, d = cfg.generate, cfg.dataset
    if cfg.task != "lm" or d.format not in ("prompt_response", "chat"):
        raise DistillError(f"dataset.format: distill generate needs prompts: task lm with format prompt_response or chat "
                           f"(got task {cfg.task}, format {d.format})")
    check_lm_limits([t.model_dump() for t in cfg.teachers], cfg.lm.k, cfg.lm.max_len, None)
    tok_dir = check_vocabulary(cfg)
    tokenizer = load_tokenizer(tok_dir)
    eos = {t.name: eos_ids(t.name, Path(t.path), tokenizer) for t in cfg.teachers}
    prompts = load_prompts(cfg, tokenizer)
    refs = reference_answers(cfg, prompts) if g.include_reference else None  # refused before any teacher runs
    names = [t["name"] for t in teacher_identities(cfg)]
    identity = {"schema_version": 1, "source": d.source, "format": d.format, "num_prompts": len(prompts),
                "prompts": hashlib.sha256(json.dumps([[p.id, p.ids] for p in prompts]).encode()).hexdigest()[:16],
                "tokenizer": tokenizer_hash(tok_dir), "teachers": teacher_identities(cfg), "eos": eos, "k": cfg.lm.k,
                "sampling": g.model_dump(include={"n", "temperature", "top_p", "max_new_tokens", "seed", "block_size",
                                                  "cross_score"})}
    out = cfg.generate_path
    manifest = out / "generate.json"
    if manifest.exists():
        have = json.loads(manifest.read_text())["identity"]
        if have != identity:
            diff = ", ".join(k for k in sorted(set(have) | set(identity)) if have.get(k) != identity.get(k))
            raise DistillError(f"generate.output: {out} holds responses generated from other settings (differ: {diff}); "
                               "delete it or set generate.output to a new folder")
    blocks = [prompts[i:i + g.block_size] for i in range(0, len(prompts), g.block_size)]
    todo = [(t, b) for b in range(len(blocks)) for t in names if not _part(out, t, b).exists()]
    # Throughput of the last run that generated (a re-curation generates nothing and keeps it).
    throughput = json.loads(manifest.read_text()).get("throughput") if manifest.exists() else None
    if todo:
        throughput = _run_teachers(cfg, out, identity, blocks, todo, eos, tokenizer, quiet)
    return _curate(cfg, out, identity, prompts, names, tokenizer, throughput, refs)


def sample_seed(seed: int, prompt_id: str, teacher: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{prompt_id}/{teacher}/{index}".encode()).digest()[:8], "little") >> 1


def _part(out: Path, teacher: str, block: int) -> Path:
    return out / "parts" / teacher / f"block-{block:05d}.parquet"


def _run_teachers(cfg, out: Path, identity: dict, blocks: list, todo: list, eos: dict, tokenizer, quiet: bool) -> None:
    from ray import serve

    from actors import teacher as serve_teachers

    from .labeling import _check_fingerprints
    from .session import ray_session, reraise_user_error

    g, names = cfg.generate, [t["name"] for t in identity["teachers"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos.values()))[0]
    teachers = {t.name: t.model_dump() for t in cfg.teachers}
    with ray_session(cfg, quiet):
        apps = serve_teachers.attach([t for t in teachers.values() if t["serve_app"]])
        owned = serve_teachers.deploy(cfg.run.name, [t for t in teachers.values() if not t["serve_app"]], "lm", cfg.lm.k)
        apps = {n: {**apps, **owned}[n] for n in names}
        try:
            first = blocks[0][0].ids
            try:
                infos = serve_teachers.probe(apps, _score_rows([first + [eos[names[0]][0]]], [len(first)], pad))
            except Exception as e:  # noqa: BLE001
                reraise_user_error(e)
            _check_fingerprints(infos, identity["teachers"], apps)
            # The teachers are sound: only now does the output folder exist.
            (out / "parts").mkdir(parents=True, exist_ok=True)
            for tmp in (out / "parts").rglob("*.tmp"):  # a part a killed run was writing: never read
                tmp.unlink()
            _write_json(out / "generate.json", {"identity": identity})
            handles = {n: serve.get_app_handle(a) for n, a in apps.items()}
            t0, written, tokens = time.perf_counter(), 0, 0
            rate = {t: {"tokens": 0, "seconds": 0.0} for t in names}
            for b in sorted({b for _, b in todo}):
                block, writers = blocks[b], [t for t in names if (t, b) in todo]
                sent = time.perf_counter()
                asked = {t: handles[t].generate.remote(
                    [p.ids for p in block], [[sample_seed(g.seed, p.id, t, i) for i in range(g.n)] for p in block],
                    {"temperature": g.temperature, "top_p": g.top_p, "max_new_tokens": g.max_new_tokens,
                     "eos_ids": eos[t], "pad_id": pad, "vocab_limit": len(tokenizer)}) for t in writers}
                try:
                    answers = _timed(asked, sent)
                except Exception as e:  # noqa: BLE001
                    reraise_user_error(e)
                for t in writers:
                    samples = [s for per_prompt in answers[t][0] for s in per_prompt]
                    rate[t]["tokens"] += sum(len(s["tokens"]) for s in samples)
                    rate[t]["seconds"] += answers[t][1]
                    metrics.generate_rate(cfg.run.name, t, rate[t]["tokens"] / rate[t]["seconds"])
                    try:
                        scores = _cross_score(handles, block, samples, g.n, pad) if g.cross_score else {}
                    except Exception as e:  # noqa: BLE001
                        reraise_user_error(e)
                    _write_part(_part(out, t, b), _part_table(block, t, g.n, samples, scores))
                    written += 1
                    tokens += sum(len(s["tokens"]) for s in samples)
                    log.info("generate: part %d/%d (teacher '%s', block %d): %d samples, %.0f tokens/s",
                             written, len(todo), t, b, len(samples), tokens / (time.perf_counter() - t0))
                    _test_hook(written, out)
        finally:
            serve_teachers.shutdown(owned)
    return {t: {**r, "tokens_per_s": r["tokens"] / r["seconds"]} for t, r in rate.items() if r["seconds"] > 0}


def _timed(asked: dict, sent: float) -> dict[str, tuple]:
    """Each teacher's generate answer and its own wall time (request sent -> answer back): the
    answers are waited on side by side, so one teacher's time does not include another's."""
    from concurrent.futures import ThreadPoolExecutor

    def wait(response):
        answer = response.result()
        return answer, time.perf_counter() - sent

    with ThreadPoolExecutor(max_workers=len(asked)) as pool:
        futures = {t: pool.submit(wait, r) for t, r in asked.items()}
        return {t: f.result() for t, f in futures.items()}


def _score_rows(seqs: list[list[int]], prompt_lens: list[int], pad: int) -> np.ndarray:
    """Packed LM rows [B, 3, L] (ids, position ids, loss mask on the response tokens), one
    sequence per row, as the teachers' `score` takes them (orchestrator/instruct.py)."""
    L = max(len(s) for s in seqs)
    rows = np.zeros((len(seqs), 3, L), np.int64)
    rows[:, 0] = pad
    for i, (s, n) in enumerate(zip(seqs, prompt_lens)):
        rows[i, 0, :len(s)], rows[i, 1, :len(s)], rows[i, 1, len(s):] = s, np.arange(len(s)), np.arange(L - len(s))
        rows[i, 2, n:len(s)] = 1
    return rows


def _cross_score(handles: dict, block: list[Prompt], samples: list[dict], n: int, pad: int) -> dict[str, list]:
    """Every teacher's NLL of every generated token: {teacher: [per sample, [T] float32]}."""
    prompts = [p.ids for p in block for _ in range(n)]
    rows = _score_rows([p + s["tokens"].tolist() for p, s in zip(prompts, samples)], [len(p) for p in prompts], pad)
    asked = {t: h.score.remote(rows) for t, h in handles.items()}
    cuts = np.cumsum([len(s["tokens"]) for s in samples])[:-1]
    return {t: np.split(np.asarray(r.result()[2], np.float32).reshape(-1), cuts) for t, r in asked.items()}


def _part_table(block: list[Prompt], teacher: str, n: int, samples: list[dict], scores: dict) -> pa.Table:
    meta = [(p, i) for p in block for i in range(n)]

    def lists(values, t):
        return pa.array([np.asarray(v).tolist() for v in values], pa.list_(t))

    cols = {
        "sample_id": pa.array([f"{p.id}/{teacher}/{i}" for p, i in meta], pa.string()),
        "prompt_id": pa.array([p.id for p, _ in meta], pa.string()),
        "row": pa.array([p.row for p, _ in meta], pa.int64()),
        "teacher": pa.array([teacher] * len(meta), pa.string()),
        "sample_index": pa.array([i for _, i in meta], pa.int32()),
        "prompt_ids": lists([p.ids for p, _ in meta], pa.int32()),
        "response_ids": lists([s["tokens"] for s in samples], pa.int32()),
        "finished": pa.array([s["finished"] for s in samples], pa.bool_()),
        "own_nll": lists([s["nll"] for s in samples], pa.float32()),
        "topk_ids": pa.array([s["topk_ids"].tolist() for s in samples], pa.list_(pa.list_(pa.int32()))),
        "topk_logprobs": pa.array([s["topk_logprobs"].tolist() for s in samples], pa.list_(pa.list_(pa.float32()))),
    }
    for t, nll in sorted(scores.items()):
        cols[f"nll.{t}"] = lists(nll, pa.float32())
    return pa.table(cols)


def _write_part(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # atomic: a part is whole or absent


def _test_hook(parts_written: int, out: Path) -> None:
    """TEST ONLY (tests/test_generate.py kills a run here): after N parts, leave a half-written
    part behind, as a kill mid-write would, and stall until killed."""
    hooks = json.loads(os.environ.get(TEST_HOOKS_ENV) or "{}")
    if hooks.get("generate_stall_after_parts") == parts_written:
        (out / "parts" / "half-written.parquet.tmp").write_bytes(b"PAR1 half a part")
        log.warning("generate: test hook: stalled after %d parts", parts_written)
        while True:
            time.sleep(1)


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _curate(cfg: DistillConfig, out: Path, identity: dict, prompts: list[Prompt], names: list[str], tokenizer,
            throughput: dict | None = None, refs: dict | None = None) -> dict:
    """All parts -> curated OUTPUT/generated.parquet; the counts into OUTPUT/generate.json."""
    g, d = cfg.generate, cfg.dataset
    paths = [_part(out, t, b) for b in range((len(prompts) + g.block_size - 1) // g.block_size) for t in names]
    # Not the per-token top-k lists (k values per generated token): curation needs none of them.
    parts = [pq.read_table(p, columns=[c for c in pq.read_schema(p).names if not c.startswith("topk_")]) for p in paths]
    table = pa.concat_tables(parts)
    rows = table.to_pylist()  # prompt order, then teacher, then sample index
    weights = {t.name: t.weight for t in cfg.teachers}
    samples = []
    for r in rows:
        tokens = r["response_ids"]
        body = tokens[:-1] if r["finished"] else tokens
        r["text"] = tokenizer.decode(body, skip_special_tokens=True)
        own = float(np.mean(r["own_nll"])) if tokens else float("nan")
        r["own_nll_mean"] = own
        r["ensemble_nll"] = mixture_nll(np.stack([r[f"nll.{t}"] for t in names]), [weights[t] for t in names]) \
            if g.cross_score else None
        samples.append({"prompt_id": r["prompt_id"], "tokens": tokens, "finished": r["finished"],
                        "empty": not r["text"].strip(), "score": r["ensemble_nll"] if g.cross_score else own})
    kept, counts = curate(samples, g.max_nll, g.keep)
    by_id = {p.id: p for p in prompts}
    keep = [{**rows[i], "origin": "teacher"} for i in kept]
    if refs is not None:  # generate.include_reference: each prompt's own answer first, then its generated ones
        grouped = {p.id: [] for p in prompts}
        for r in keep:
            grouped[r["prompt_id"]].append(r)
        keep = [x for p in prompts for x in [reference_record(p, refs[p.id]), *grouped[p.id]]]
    cols = {"sample_id": pa.array([r["sample_id"] for r in keep], pa.string())}
    if d.format == "prompt_response":
        cols[d.prompt] = pa.array([by_id[r["prompt_id"]].value for r in keep], pa.string())
        cols[d.response] = pa.array([r["text"] for r in keep], pa.string())
    else:
        cols[d.messages] = pa.array([r.get("conversation") or by_id[r["prompt_id"]].value + [
            {"role": "assistant", "content": r["text"]}] for r in keep],
            pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))
    cols.update({
        "origin": pa.array([r["origin"] for r in keep], pa.string()),  # teacher | reference
        "prompt_id": pa.array([r["prompt_id"] for r in keep], pa.string()),
        "teacher": pa.array([r["teacher"] for r in keep], pa.string()),
        "sample_index": pa.array([r["sample_index"] for r in keep], pa.int32()),
        "response_ids": pa.array([r["response_ids"] for r in keep], pa.list_(pa.int32())),
        "own_nll": pa.array([r["own_nll_mean"] for r in keep], pa.float32()),
        "ensemble_nll": pa.array([r["ensemble_nll"] for r in keep], pa.float32()),
    })
    dataset = out / "generated.parquet"
    tmp = dataset.with_name(dataset.name + ".tmp")
    pq.write_table(pa.table(cols), tmp)
    os.replace(tmp, dataset)
    curation = {**counts, "max_nll": g.max_nll, "keep": g.keep,
                "score": "ensemble NLL per token (weighted mixture, T=1)" if g.cross_score else "own teacher's NLL per token",
                "per_teacher": {t: sum(1 for r in keep if r["teacher"] == t) for t in names},
                "references": sum(1 for r in keep if r["origin"] == "reference")}
    _write_json(out / "generate.json", {"identity": identity, "curation": curation, "dataset": str(dataset),
                                        **({"throughput": throughput} if throughput else {})})
    dropped = ", ".join(f"{k} {v}" for k, v in counts["dropped"].items())
    log.info("generate: %d responses, %d kept (dropped: %s) -> %s", counts["total"], counts["kept"], dropped, dataset)
    return {"dataset": str(dataset), "manifest": str(out / "generate.json"), **curation,
            "throughput": throughput or {}}
