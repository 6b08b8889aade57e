"""The causal-LM path end to end on real Ray: HF teachers on Serve, top-k store, LM student."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator import codec, pipeline
from orchestrator.cli import main
from orchestrator.config import config_from_dict
from orchestrator.ensemble import ensemble_topk
from orchestrator.errors import DistillError
from orchestrator.store import LabelStore, decode_topk, topk_columns
from tests.helpers import write_yaml
from tests.helpers_lm import as_remote_code, lm_config, make_lm, make_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm_run(ray_local, lm_setup, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmrun")
    raw = lm_config(tmp, lm_setup)
    # 'small' is a copy of its Llama whose config names its own code (auto_map, model_type
    # tiny_custom): its Serve replica must load that code (test_a_teacher_with_its_own_code_...).
    # ('large' stays plain: tests below build students from its layers.)
    small = raw["teachers"][0]
    assert small["name"] == "small"
    small.update(path=str(as_remote_code(lm_setup["teachers"]["small"], tmp / "small_own_code")), trust_remote_code=True)
    cfg = config_from_dict(raw)
    return cfg, pipeline.run(cfg)


def test_topk_store_rows_types_and_soft_labels(lm_run, lm_setup):
    cfg, _ = lm_run
    prep = pipeline.prepare(cfg)
    store = LabelStore(cfg.store_path)
    store.load_manifest()
    table = pq.ParquetDataset(store.shard_paths()).read()
    assert sorted(table.column("sample_id").to_pylist()) == sorted(prep.train.column("sample_id").to_pylist())
    k, positions = 8, cfg.lm.max_len - 1
    for who in ("small", "large", "soft"):
        ids_col, lps_col = topk_columns(who)
        # schema version 3 (orchestrator/codec.py): gap-coded ids, k + 1 uint8 codes per position
        for col, want, width in ((ids_col, pa.uint16(), k), (lps_col, pa.uint8(), k + 1)):
            t = table.schema.field(col).type
            assert (t.value_type, t.list_size) == (want, positions * width)
    # Stored soft labels are the configured top-k ensemble of the stored teacher labels.
    order = [t["name"] for t in store.manifest["teachers"]]  # the store's one teacher order: by name
    assert order == ["large", "small"]
    ids = np.stack([decode_topk(table, n, k)[0].reshape(-1, k) for n in order])
    lps = np.stack([decode_topk(table, n, k)[1].reshape(-1, k) for n in order])
    e_ids, e_lps, _ = ensemble_topk(ids, lps, k_out=k, vocab_size=store.manifest["lm"]["vocab_size"],
                                    mode="mean_prob", temperature=2.0)
    # The labeler ensembles the decoded labels it stores, so recomputing (and storing) is exact.
    s_ids, s_lps = decode_topk(table, "soft", k)
    want_ids, want_lps = codec.roundtrip(e_ids, e_lps)
    np.testing.assert_array_equal(s_ids.reshape(-1, k), want_ids)
    np.testing.assert_array_equal(s_lps.reshape(-1, k), want_lps)


def test_a_teacher_with_its_own_code_labels_through_serve(lm_run, lm_setup):
    """teachers[].trust_remote_code reaches the Serve replica: 'small' (code in its dir) labeled the
    store, and its labels are those of the plain Llama with the same weights, scored here."""
    from orchestrator.models import CausalLMTeacher

    cfg, _ = lm_run
    small = {t.name: t for t in cfg.teachers}["small"]
    assert small.trust_remote_code
    assert json.loads((Path(small.path) / "config.json").read_text())["model_type"] == "tiny_custom"
    store = LabelStore(cfg.store_path)
    store.load_manifest()
    table = pq.ParquetDataset(store.shard_paths()).read()
    k = cfg.lm.k
    got_ids, got_lps = (a.reshape(len(table), -1, k) for a in decode_topk(table, "small", k))
    windows = np.stack(table.column("input_ids").to_numpy(zero_copy_only=False))
    plain = CausalLMTeacher({"name": "plain", "backend": "hf", "path": str(lm_setup["teachers"]["small"])}, k=k)
    ids, lps = plain(windows)
    want_ids, want_lps = (a.reshape(got_ids.shape) for a in codec.roundtrip(ids.reshape(-1, k), lps.reshape(-1, k)))
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_lps, want_lps, atol=1e-5)


def test_reensemble_topk_store_without_teachers(lm_run, monkeypatch):
    cfg, _ = lm_run
    import actors.teacher

    monkeypatch.setattr(actors.teacher, "deploy", lambda *a, **k: (_ for _ in ()).throw(AssertionError("deployed")))
    store = LabelStore(cfg.store_path)
    store.load_manifest()
    before = [open(p, "rb").read() for p in store.shard_paths()]
    changed = cfg.model_copy(deep=True)
    changed.ensemble.mode, changed.teachers[1].weight = "ca_mkd", 3.0  # teachers[1]: 'large'
    pipeline.label(changed, pipeline.prepare(changed), reensemble=True)
    store.load_manifest()  # a re-ensemble writes a new generation of shard files
    table = pq.ParquetDataset(store.shard_paths()).read()
    k, vocab = cfg.lm.k, store.manifest["lm"]["vocab_size"]
    order = [t["name"] for t in store.manifest["teachers"]]  # the store's one teacher order: by name
    assert order == ["large", "small"]
    ids = np.stack([decode_topk(table, n, k)[0].reshape(-1, k) for n in order])
    lps = np.stack([decode_topk(table, n, k)[1].reshape(-1, k) for n in order])
    windows = np.stack(table.column("input_ids").to_numpy(zero_copy_only=False))
    e_ids, e_lps, _ = ensemble_topk(ids, lps, k_out=k, vocab_size=vocab, mode="ca_mkd", temperature=2.0,
                                    weights=[3.0, 1.0], labels=windows[:, 1:].reshape(-1))
    np.testing.assert_array_equal(decode_topk(table, "soft", k)[0].reshape(-1, k), codec.roundtrip(e_ids, e_lps)[0])
    assert LabelStore(cfg.store_path).load_manifest()["ensemble"]["mode"] == "ca_mkd"
    # Back to the original settings: the shards are byte-identical to the labeled ones.
    pipeline.label(cfg, pipeline.prepare(cfg), reensemble=True)
    store.load_manifest()
    assert [open(p, "rb").read() for p in store.shard_paths()] == before
    bpt = store.bytes_per_token()
    assert set(bpt) == {"small", "large", "soft"} and all(0 < v < k * 4 for v in bpt.values())


def test_lm_report(lm_run):
    cfg, out = lm_run
    report = json.loads((cfg.run_dir / "report.json").read_text())
    assert report["task"] == "lm"
    assert set(report["models"]) == {"small", "large", "ensemble", "student", "student_hard"}
    vocab = 300
    for m in report["models"].values():
        assert 1.0 < m["perplexity"] < vocab * 2 and isinstance(m["params"], int)
    # The teachers learned something: clearly better than a uniform guess over the vocabulary.
    assert report["models"]["large"]["perplexity"] < vocab / 3
    # mean_prob: the ensemble's perplexity is exact, the weighted mixture of the teachers'
    # own probabilities of each true token (never worse than the worse teacher's).
    assert "approximation" not in report["models"]["ensemble"]
    assert report["models"]["ensemble"]["perplexity"] <= max(report["models"][t]["perplexity"] for t in ("small", "large"))


def test_inspect_shows_bytes_per_token(lm_run, capsys):
    cfg, _ = lm_run
    assert main(["inspect", cfg.store_path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["label_kind"] == "topk" and info["k"] == 8 and info["bytes_per_token"]["soft"] > 0


def test_teachers_with_different_vocabularies_are_refused(lm_setup, tmp_path):
    from tests.helpers_lm import corpus

    other_tok = make_tokenizer(tmp_path / "tok2", corpus(6), vocab=280)
    other = make_lm(tmp_path / "other", other_tok, corpus(6), 32, 1, seed=5, steps=1)
    raw = lm_config(tmp_path, lm_setup)
    raw["teachers"][1]["path"] = str(other)
    cfg = config_from_dict(raw)
    with pytest.raises(DistillError, match=r"teachers 'small' and 'large' use different vocabularies"):
        pipeline.prepare(cfg)
    code = main(["label", str(write_yaml(tmp_path / "c.yaml", raw))])
    assert code == 2 and not LabelStore(cfg.store_path).exists()




def test_tokenizer_files_that_differ_only_in_bytes_are_one_vocabulary(lm_setup, tmp_path, caplog):
    """A teacher re-saved with its tokenizer files reformatted and another pad token (as a
    fine-tuning script saves it) maps every id to the same token: accepted, with a log line;
    a tokenizer with another id -> token map is still refused (test above)."""
    import shutil

    from orchestrator.prepare import check_vocabulary

    copy = tmp_path / "resaved"
    shutil.copytree(lm_setup["teachers"]["large"], copy)
    tok = json.loads((copy / "tokenizer.json").read_text())
    (copy / "tokenizer.json").write_text(json.dumps(tok, indent=4, sort_keys=True))
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": config["eos_token"]}))
    raw = lm_config(tmp_path, lm_setup)
    raw["teachers"][1]["path"] = str(copy)
    with caplog.at_level("INFO", logger="distill"):
        assert check_vocabulary(config_from_dict(raw)) == str(lm_setup["teachers"]["small"])
    assert "differ, but map every id to the same token" in caplog.text
    vocab = tok["model"]["vocab"]  # two regular ids now name each other's tokens
    a, b = (next(t for t, i in vocab.items() if i == n) for n in (280, 281))
    vocab[a], vocab[b] = 281, 280
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DistillError, match=r"teachers 'small' and 'large' use different vocabularies \(tokenizer "
                                           r"files differ: id 280 is .* in 'small', .* in 'large', id 281 .*\); "
                                           r"one ensemble needs one tokenizer"):
        check_vocabulary(config_from_dict(raw))


def test_one_familys_tokenizer_versions_are_one_vocabulary(lm_setup, tmp_path, caplog):
    """Versions of one family's tokenizer agree on every regular token and differ in renamed
    special ids (Llama 3 -> 3.1 named reserved ids) or in tokens added past the other's (Qwen3's
    <think> past Qwen2.5's 151,665 ids): accepted, the ensemble tokenizes with the narrowest
    whatever the teachers' order, and the log names what differs."""
    import shutil

    from transformers import AutoTokenizer

    from orchestrator.vocab import check_vocabulary, ensemble_tokenizer

    dirs = {}
    versions = {"v1": ["<|reserved_0|>", "<|reserved_1|>"], "v2": ["<|tool|>", "<|reserved_1|>", "<think>"]}
    for name, added in versions.items():
        dirs[name] = tmp_path / name
        shutil.copytree(lm_setup["teachers"]["small" if name == "v1" else "large"], dirs[name])
        tok = AutoTokenizer.from_pretrained(str(dirs[name]))
        tok.add_special_tokens({"additional_special_tokens": added})
        tok.save_pretrained(str(dirs[name]))
    raw = lm_config(tmp_path, lm_setup)
    raw["teachers"][0]["path"], raw["teachers"][1]["path"] = str(dirs["v2"]), str(dirs["v1"])  # the wider first
    cfg = config_from_dict(raw)
    with caplog.at_level("INFO", logger="distill"):
        assert check_vocabulary(cfg) == ensemble_tokenizer(cfg) == str(dirs["v1"])
    assert ("teacher 'small' reads the 302 ids of the ensemble's tokenizer" in caplog.text
            and "but for 1 renamed special ids (id 300 is '<|reserved_0|>' in 'large', '<|tool|>' in 'small')"
            in caplog.text
            and "its 1 ids past them are never written" in caplog.text)
    raw["lm"]["tokenizer"] = str(dirs["v2"])  # the wider one named: 'large' (v1) lacks id 302
    with pytest.raises(DistillError, match=r"lm\.tokenizer .*v2 differs from teacher 'large' tokenizer \(id 302 is "
                                           r"'<think>' in lm\.tokenizer, None in 'large'\)"):
        check_vocabulary(config_from_dict(raw))

def test_teachers_and_student_that_differ_in_padding_rows(lm_run, tmp_path):
    """Checkpoints of one family pad their vocabulary differently (Qwen2.5 1.5B 151,936 rows, 7B
    152,064, same tokenizer), and a newer version's tokenizer adds tokens past the older's (Qwen3's
    <think> past Qwen2.5's 151,665): here 'large' saved with 20 padding rows past the 300 tokens
    and 3 special tokens added to its tokenizer, beside 'small' (300) and a 300-row student. The
    run tokenizes with small's tokenizer (the narrower), labels with both, the ensemble spans 320
    ids, and the student is resized to 320 and exported so with the 300-token tokenizer; nothing
    is refused."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, _ = lm_run
    large = cfg.teachers[1].path
    wide = AutoModelForCausalLM.from_pretrained(large, local_files_only=True)
    wide.resize_token_embeddings(320, mean_resizing=False)
    with torch.no_grad():  # zero rows: logit 0 for every padding id, which then takes some mass
        wide.lm_head.weight[300:] = 0
    wide.save_pretrained(str(tmp_path / "wide"))
    tok = AutoTokenizer.from_pretrained(large)
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>", "<tool>"]})  # ids 300-302
    tok.save_pretrained(str(tmp_path / "wide"))
    raw = cfg.model_dump(mode="json")
    raw["run"]["name"] = "tinylm_padded"
    raw["store"]["path"] = str(tmp_path / "store")
    raw["teachers"][1]["path"] = str(tmp_path / "wide")
    raw["train"].update(max_steps=3, epochs=5)
    raw["eval"]["baseline"] = False
    new = config_from_dict(raw)
    out = pipeline.run(new)
    store = LabelStore(new.store_path)
    manifest = store.load_manifest()
    assert manifest["num_classes"] == 320 and manifest["lm"]["vocab_size"] == 320
    table = pq.ParquetDataset(store.shard_paths()).read()
    assert int(decode_topk(table, "small", 8)[0].max()) < 300  # the narrow teacher lists only its own ids
    assert int(decode_topk(table, "large", 8)[0].max()) < 320
    student = AutoModelForCausalLM.from_pretrained(str(new.run_dir / "students" / "student"), local_files_only=True)
    assert student.config.vocab_size == 320 and student.get_output_embeddings().weight.shape[0] == 320
    assert pipeline.prepare(new).tokenizer == cfg.teachers[0].path  # small's, though 'large' has more tokens
    assert len(AutoTokenizer.from_pretrained(str(new.run_dir / "students" / "student"))) == 300
    for name in ("small", "large", "ensemble", "student"):
        assert 1.0 < out["models"][name]["perplexity"] < 600, name

def test_exported_student_loads_with_transformers_and_reproduces_the_reported_nll(lm_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, _ = lm_run
    report = json.loads((cfg.run_dir / "report.json").read_text())
    windows = np.stack(pipeline.prepare(cfg).test.column("input_ids").to_numpy(zero_copy_only=False)).astype(np.int64)
    for name in ("student", "student_hard"):
        out = cfg.run_dir / "students" / name
        model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
        assert len(AutoTokenizer.from_pretrained(str(out), local_files_only=True)) == 300
        with torch.inference_mode():
            logits = model(input_ids=torch.from_numpy(windows)).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.from_numpy(windows[:, 1:])).item()
        assert abs(nll - report["models"][name]["nll"]) < 1e-3, (name, nll, report["models"][name]["nll"])


def test_teacher_initialised_student_with_a_step_budget(lm_run, tmp_path):
    """student.init teacher (the large teacher's second layer), trained for 3 optimiser steps of 2
    accumulated batches with warmup, cosine decay, clipping and gradient checkpointing, from the same store (no labeling),
    exported in bfloat16;
    `distill export --checkpoint` writes a loadable dir from its Ray Train checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg, _ = lm_run
    raw = cfg.model_dump(mode="json")
    raw["run"]["name"] = "tinylm_from_teacher"
    raw["store"]["path"] = cfg.store_path
    raw["lm"]["student_config"] = None
    raw["student"] = {"init": "teacher", "teacher": "large", "layers": [1], "export_dtype": "bfloat16"}
    raw["train"].update(max_steps=3, grad_accum=2, warmup_steps=1, schedule="cosine", grad_clip=1.0, epochs=5,
                        gradient_checkpointing=True)
    raw["eval"]["baseline"] = False
    for key in ("arch", "hidden", "config", "path"):
        raw["student"].pop(key, None)
    path = write_yaml(tmp_path / "c.yaml", {k: v for k, v in raw.items()})
    new = config_from_dict(raw)
    out = pipeline.run(new)
    state = torch.load(new.run_dir / "students" / "student.pt", weights_only=False)
    assert sum(h["steps"] for h in state["history"]) == 3
    assert all(h["gradient_checkpointing"] for h in state["history"])  # on in the DDP workers
    assert state["spec"]["init"] == "teacher" and out["models"]["student"]["perplexity"] < 300
    student = AutoModelForCausalLM.from_pretrained(str(new.run_dir / "students" / "student"), local_files_only=True)
    assert student.config.num_hidden_layers == 1 and student.config.hidden_size == 48  # the large teacher's width
    assert student.dtype == torch.bfloat16  # student.export_dtype (training was float32: the state file is)
    assert state["model"]["model.norm.weight"].dtype == torch.float32
    ckpt = sorted(p for p in (new.run_dir / "train").glob("student-*/checkpoint_*") if p.is_dir())[-1]
    # A file that is no checkpoint (Ray Train's snapshot beside them): one error line, exit 2.
    snapshot = next((new.run_dir / "train").glob("student-*/checkpoint_manager_snapshot.json"))
    assert main(["export", str(path), "--checkpoint", str(snapshot), "-q"]) == 2
    assert main(["export", str(path), "--checkpoint", str(ckpt), "--out", str(tmp_path / "exported"), "-q"]) == 0
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"), local_files_only=True)
    for a, b in zip(student.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_teachers_are_scored_through_serve_and_rescored_when_missing(lm_run):
    """Labeling kept each teacher's held-out scores (run_dir/eval/, from its Serve deployment);
    with one deleted, evaluation deploys that teacher again and gets the same report."""
    cfg, _ = lm_run
    report = json.loads((cfg.run_dir / "report.json").read_text())
    for name in ("small", "large"):
        with np.load(cfg.run_dir / "eval" / f"{name}.npz") as z:
            assert float(z["nll"].mean()) == pytest.approx(report["models"][name]["nll"], rel=1e-6)
            assert int(z["params"]) == report["models"][name]["params"] > 0
    (cfg.run_dir / "eval" / "large.npz").unlink()
    again = pipeline.evaluate_and_report(cfg, pipeline.prepare(cfg))["models"]
    assert (cfg.run_dir / "eval" / "large.npz").exists()
    for name in ("small", "large", "ensemble", "student"):
        assert again[name]["nll"] == pytest.approx(report["models"][name]["nll"], abs=1e-6)
