"""Bad input, a catalogue (docs/bad_input.md lists every case).

Every case runs the real CLI (`distill label`) and must end with exit status 2 and exactly one
stderr line `error: ...` naming the field, file, column or teacher at fault. Every case points at
the run dir of one store labeled once per module (same output_dir and run.name), and that store
must come out byte-for-byte intact: config, dataset and LM errors are found before the store
opens. Teachers' outputs are only known once they run: those cases are refused at the good store
(other teachers built it) and, at a new store, write no shard the bad teacher touched.
"""
from __future__ import annotations

import json

import copy
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.cli import main
from orchestrator.datasets import features_of
from orchestrator.store import LabelStore
from tests.helpers import InfTeacher, NaNTeacher, save_script, tiny_config, train_tiny, write_yaml
from tests.helpers_lm import (as_remote_code, corpus, lm_config, make_lm, make_tokenizer, make_untrained_lm_setup,
                              write_instruct_files)

# Every case is checked against a store that real Ray labeled (the `good` fixture).
pytestmark = pytest.mark.slow


@dataclass
class Good:
    cfg: dict  # the config that labeled the store
    run_dir: Path
    files: dict[str, bytes]  # every file under run_dir, as labeled


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def good(ray_local, teachers, tmp_path_factory) -> Good:
    """One finished store (280 rows, 2 shards); every bad run below points at its run dir."""
    tmp = tmp_path_factory.mktemp("good")
    cfg = tiny_config(tmp, teachers, dataset={"limit": 400})
    assert main(["label", str(write_yaml(tmp / "good.yaml", cfg)), "-q"]) == 0
    run_dir = Path(cfg["output_dir"]) / cfg["run"]["name"]
    store = LabelStore(str(run_dir / "store"))
    store.load_manifest()
    assert store.complete
    return Good(cfg, run_dir, _snapshot(run_dir))


def _like_good(good: Good, change=lambda cfg: None) -> dict:
    cfg = copy.deepcopy(good.cfg)
    change(cfg)
    return cfg


def _refused(capsys, good: Good, cfg_path: Path, *args: str) -> str:
    """`distill label`: exit 2, one stderr line `error: ...`, and the good store untouched."""
    capsys.readouterr()  # only what the CLI writes counts
    code = main(["label", str(cfg_path), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert _snapshot(good.run_dir) == good.files
    return err


def _check(capsys, good: Good, tmp_path: Path, cfg: dict, expect: str, *args: str) -> str:
    err = _refused(capsys, good, write_yaml(tmp_path / "bad.yaml", cfg), *args)
    assert re.search(expect, err), err
    # A run that reached the store would have said this instead: the bad input must speak first.
    assert "labeled with a different setup" not in err
    return err


# ---- config: checked on load, before anything else ----------------------------------------


def _teacher(i: int, **kv):
    return lambda c: c["teachers"][i].update(**kv)


def _section(name: str, **kv):
    return lambda c: c.setdefault(name, {}).update(**kv)


@pytest.mark.parametrize(
    "change, expect",
    [
        (_section("train", epohcs=3), r"train\.epohcs: unknown key \(check the spelling\)"),
        (_section("trian", epochs=3), r": trian: unknown key \(check the spelling\)"),
        (_section("train", epochs="three"), r"train\.epochs: Input should be a valid integer.*\(got 'three'\)"),
        (lambda c: c.update(train=3), r"train: expected a section of key: value pairs \(got 3\)"),
        (_section("store", shard_size=-5), r"store\.shard_size: Input should be greater than or equal to 1 \(got -5\)"),
        (_section("dataset", limit=-3), r"dataset\.limit: Input should be greater than 0 \(got -3\)"),
        (_teacher(1, backend="onnx"), r"teachers\.1\.backend: Input should be 'torch', 'hf' or 'vllm' \(got 'onnx'\)"),
        (_section("ensemble", mode="median"), r"ensemble\.mode: Input should be 'mean_prob', .*'ca_mkd' \(got 'median'\)"),
        (_section("train", loss="mse"), r"train\.loss: Input should be 'kd', .*'jsd' \(got 'mse'\)"),
        (_section("label", executor="threads"), r"label\.executor: Input should be 'auto', 'driver' or 'ray_data' \(got 'threads'\)"),
        (_teacher(0, path="/nonexistent/teacher.pt"), r"teacher 'linear': path not found: /nonexistent/teacher\.pt"),
        (_teacher(0, path=__file__), r"teacher 'linear': .*test_bad_input\.py is not a TorchScript or torch\.save file"),
        (lambda c: [t.update(weight=0) for t in c["teachers"]], r"teachers: at least one teacher needs weight > 0"),
        (_teacher(0, weight=-1), r"teachers\.0\.weight: Input should be greater than or equal to 0 \(got -1\)"),
        (_section("dataset", test_fraction=0), r"dataset\.test_fraction: Input should be greater than 0 \(got 0\)"),
        (_section("dataset", test_fraction=1.0), r"dataset\.test_fraction: Input should be less than 1 \(got 1\.0\)"),
        (_teacher(1, name="linear"), r"teachers: teacher names must be unique, repeated: linear"),
        (_section("lm", k=3), r"lm\.k: not used by task classification; remove it, or set the task that uses it"),
        (_section("dataset", text="body"), r"dataset\.text: not used by task classification"),
        (_section("store", path="/proc/distill/store"), r"store\.path: cannot create /proc/distill/store: .*; give a "
                                                          r"writable local path or a reachable URI"),
        # A bucket behind an endpoint nobody listens on (loopback): what an unreachable s3:// looks like.
        (_section("store", path="s3://no-bucket/store?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"),
         r"store\.path: cannot reach s3://no-bucket/store\?.*: .*(connect|NETWORK).*; give a local path or a reachable"),
        (_teacher(0, engine={"dtype": "bfloat16"}),
         r"teachers\.0: engine: vLLM engine settings apply to backend vllm only \(teacher 'linear' is torch\); remove engine"),
        (_teacher(0, backend="vllm", engine={"tensor_parallel_size": 0}),
         r"teachers\.0\.engine\.tensor_parallel_size: Input should be greater than or equal to 1 \(got 0\)"),
        (_teacher(0, backend="vllm", engine={"tensor_parallel_size": 2}),
         r"teachers\.0: engine\.tensor_parallel_size: 2 shards need num_gpus: 2 \(one GPU each\) on teacher 'linear' "
         r"\(got num_gpus: 0\)"),
        (_teacher(0, trust_remote_code=True),
         r"teachers\.0: trust_remote_code: applies to backends hf and vllm \(teacher 'linear' is torch, whose code is "
         r"named by module\); remove it"),
        (_section("train", gradient_checkpointing=True),
         r"train\.gradient_checkpointing: applies to transformer students \(task lm, or student\.arch hf\); the MLP "
         r"student has no layers to recompute; remove it"),
        (_teacher(0, health_check_timeout_s=0),
         r"teachers\.0\.health_check_timeout_s: Input should be greater than 0 \(got 0\)"),
        (_section("train", on_policy={"fraction": 1.5}),
         r"train\.on_policy\.fraction: Input should be less than or equal to 1 \(got 1\.5\)"),
        (_section("train", on_policy={"fraction": 0.5}),
         r"train\.on_policy: needs task lm with instruction data \(dataset\.format prompt_response or chat\), "
         r"got task classification; remove train\.on_policy"),
        # the embedded Ray of the tests has 2 CPUs: a teacher asking for 3 would wait for ever
        (_teacher(0, num_cpus=3), r"resources: label holds [\d.]+ CPU at once \(teachers\[\]\.replicas x num_cpus / "
                                  r"num_gpus\) and the cluster has 2 .*raise ray\.num_cpus"),
    ],
    ids=["mistyped-key", "unknown-section", "wrong-type", "section-not-a-mapping", "negative-size", "negative-limit",
         "unknown-backend", "unknown-mode", "unknown-loss", "unknown-label-executor",
         "missing-teacher-path", "teacher-not-a-model-file",
         "weights-all-zero", "weight-negative", "test-fraction-zero", "test-fraction-one", "duplicate-teacher-names",
         "lm-key-on-classification", "text-column-on-classification", "store-path-not-creatable",
         "store-path-unreachable-bucket",
         "engine-on-a-torch-teacher", "tensor-parallel-below-1", "tensor-parallel-without-gpus",
         "trust-remote-code-on-a-torch-teacher", "checkpointing-an-mlp-student", "health-check-timeout-0",
         "on-policy-fraction-above-1", "on-policy-on-classification", "teachers-need-more-cpus-than-the-cluster"],
)
def test_config_errors(good, tmp_path, capsys, change, expect):
    _check(capsys, good, tmp_path, _like_good(good, change), expect)


# ---- the command line: file and overrides ---------------------------------------------------


def test_missing_config_file(good, tmp_path, capsys):
    err = _refused(capsys, good, tmp_path / "nope.yaml")
    assert err == f"error: config file not found: {tmp_path / 'nope.yaml'}"


def test_yaml_syntax_error(good, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(f"output_dir: {good.cfg['output_dir']}\nrun: {{name: tiny\ntrain: {{epochs: 1}}\n")
    err = _refused(capsys, good, path)
    assert re.search(rf"{path}: not valid YAML: line 3, column 6: .*; fix the syntax there$", err), err


@pytest.mark.parametrize(
    "override, expect",
    [
        ("train.epochs", r"override 'train\.epochs': expected section\.key=value"),
        ("trian.epochs=3", r"trian: unknown key \(check the spelling\)"),
        ("teachers.5.weight=2", r"override 'teachers\.5\.weight': no item 5 in teachers"),
        ("train.epochs=many", r"train\.epochs: Input should be a valid integer.*\(got 'many'\)"),
    ],
    ids=["override-without-equals", "override-unknown-section", "override-no-such-teacher", "override-wrong-type"],
)
def test_override_errors(good, tmp_path, capsys, override, expect):
    _check(capsys, good, tmp_path, _like_good(good), expect, override)


@pytest.mark.parametrize("argv", [["-q", "label", "CFG", "trian.epochs=3"], ["label", "CFG", "-q", "trian.epochs=3"],
                                  ["label", "CFG", "run.name=tiny", "--quiet", "trian.epochs=3"]],
                         ids=["before-the-command", "before-the-overrides", "between-overrides"])
def test_quiet_flag_anywhere_on_the_line(good, tmp_path, capsys, argv):
    import logging

    path = write_yaml(tmp_path / "c.yaml", _like_good(good))
    capsys.readouterr()
    code = main([str(path) if a == "CFG" else a for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith("trian: unknown key (check the spelling)"), err  # the override after -q was read
    assert logging.getLogger("distill").level == logging.WARNING
    assert _snapshot(good.run_dir) == good.files


def test_console_script_exits_nonzero(good, tmp_path):
    path = write_yaml(tmp_path / "c.yaml", _like_good(good, _section("trian", epochs=1)))
    p = subprocess.run(["distill", "run", str(path)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == f"error: {path}: trian: unknown key (check the spelling)"
    assert _snapshot(good.run_dir) == good.files


# ---- the dataset: read and validated in prepare, before the store opens ---------------------


def _parquet(tmp: Path, table: pa.Table) -> str:
    pq.write_table(table, tmp / "data.parquet")
    return str(tmp / "data.parquet")


def _rows(n: int, width: int = 64, **columns) -> pa.Table:
    return pa.table({"features": [[1.0] * width] * n, "label": [i % 10 for i in range(n)], **columns})


def _corrupt(tmp: Path) -> str:
    (tmp / "data.parquet").write_bytes(b"PAR1 not really")
    return str(tmp / "data.parquet")


@pytest.mark.parametrize(
    "dataset, expect",
    [
        (lambda t: {"source": _parquet(t, _rows(0))}, r"dataset\.source: .*data\.parquet has no rows"),
        (lambda t: {"source": _parquet(t, _rows(10).rename_columns(["features", "target"]))},
         r"dataset\.label: column 'label' not found in .*; available columns: features, target"),
        (lambda t: {"source": _parquet(t, _rows(10)), "features": "pixels"},
         r"dataset\.features: column 'pixels' not found in .*; available columns: features, label"),
        (lambda t: {"source": _parquet(t, pa.table({"features": ["a"] * 10, "label": [0] * 10}))},
         r"dataset\.features: columns \['features'\] in .* are not numeric .*could not convert string to float: 'a'"),
        (lambda t: {"source": _parquet(t, pa.table({"features": [[float("nan")] * 64] * 10, "label": [0] * 10}))},
         r"dataset\.features: row 0 of .* holds NaN or Inf; clean the data first"),
        (lambda t: {"source": str(t / "nope.parquet")}, r"dataset\.source: file not found: .*nope\.parquet"),
        (lambda t: {"source": _corrupt(t)}, r"dataset\.source: cannot read .*data\.parquet as parquet: "),
        (lambda t: {"source": _parquet(t, _rows(3)), "test_fraction": 0.1},
         r"dataset\.test_fraction: 0\.1 leaves an empty split of 3 rows"),
    ],
    ids=["empty-dataset", "missing-label-column", "missing-feature-column", "string-features", "nan-features",
         "dataset-file-not-found", "corrupt-parquet", "test-fraction-leaves-empty-split"],
)
def test_dataset_errors(good, tmp_path, capsys, dataset, expect):
    _check(capsys, good, tmp_path, _like_good(good, _section("dataset", limit=None, **dataset(tmp_path))), expect)


# ---- student.arch hf: the transformer student is checked in prepare, before labeling ------------

_HF_STUDENT = {"model_type": "bert", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1,
               "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64, "num_labels": 10}


@pytest.mark.parametrize(
    "student, expect",
    [
        ({"num_labels": 3}, r"student\.config: the student has num_labels 3, the dataset has class id 9; "
                            r"set num_labels to the teachers' class count in its config\.json"),
        ({"vocab_size": 8}, r"dataset\.features: student\.arch hf reads the features as token ids, integers in "
                            r"\[0, 8\) \(its vocab_size\); found values in \[0, 16\]"),
        ({"max_position_embeddings": 32}, r"dataset\.features: rows of 64 tokens are longer than the student takes "
                                          r"\(max_position_embeddings 32\)"),
    ],
    ids=["hf-student-num-labels", "hf-student-vocab-below-the-token-ids", "hf-student-positions-below-the-row"],
)
def test_hf_student_errors(good, tmp_path, capsys, student, expect):
    (tmp_path / "student.json").write_text(json.dumps({**_HF_STUDENT, **student}))
    cfg = _like_good(good, lambda c: c.update(student={"arch": "hf", "config": str(tmp_path / "student.json")}))
    _check(capsys, good, tmp_path, cfg, expect)


def test_hf_student_without_a_config(good, tmp_path, capsys):
    cfg = _like_good(good, lambda c: c.update(student={"arch": "hf"}))
    _check(capsys, good, tmp_path, cfg, r"student\.config: required for student\.arch hf with student\.init scratch")


# ---- train.extra_losses: the student layers the terms read are checked in prepare ----------------


@pytest.mark.parametrize(
    "student, layer, expect",
    [
        (None, "net.9", r"train\.extra_losses\.0\.student_layer: student\.arch mlp takes a module name "
                        r"\(net, net\.0, net\.1, net\.2\), got 'net\.9'"),
        (_HF_STUDENT, 2, r"train\.extra_losses\.0\.student_layer: index 2 out of range: the student has 2 hidden "
                         r"states \(0 = embeddings \.\. 1\)"),
    ],
    ids=["extra-loss-unknown-student-module", "extra-loss-student-layer-out-of-range"],
)
def test_extra_loss_student_layer_errors(good, tmp_path, capsys, student, layer, expect):
    from tests.helpers import save_state_teacher

    def change(c):
        c["teachers"].append({"name": "state", "backend": "torch", "module": "tests.helpers:TinyMLP",
                              "path": str(save_state_teacher(tmp_path / "state.pt")), "features": ["net.1"]})
        c["train"]["extra_losses"] = [{"kind": "rkd_distance", "teacher": "state", "teacher_layer": "net.1",
                                       "student_layer": layer}]
        if student is not None:
            (tmp_path / "student.json").write_text(json.dumps(student))
            c["student"] = {"arch": "hf", "config": str(tmp_path / "student.json")}
    _check(capsys, good, tmp_path, _like_good(good, change), expect)


# ---- task lm: vocabulary, k, lengths and text are checked in prepare ------------------------


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    return make_untrained_lm_setup(tmp_path_factory.mktemp("lm"))


def _lm_like_good(good: Good, lm_files: dict, tmp: Path, **sections) -> dict:
    cfg = lm_config(tmp, lm_files, **sections)
    cfg["output_dir"], cfg["run"] = good.cfg["output_dir"], dict(good.cfg["run"])  # the good store's run dir
    return cfg


def _texts(tmp: Path, texts: list[str]) -> dict:
    pq.write_table(pa.table({"text": texts}), tmp / "text.parquet")
    return {"source": str(tmp / "text.parquet")}


@pytest.mark.parametrize(
    "sections, expect",
    [
        (lambda t: {"lm": {"k": 301}},
         r"lm\.k: 301 is larger than teacher 'small' vocabulary \(300 tokens\); set lm\.k <= 300"),
        (lambda t: {"lm": {"max_len": 128}},
         r"lm\.max_len: 128 tokens is longer than teacher 'small' takes \(64 positions in .*small/config\.json\); "
         r"set lm\.max_len <= 64"),
        (lambda t: {"dataset": _texts(t, ["", "  ", "\n"])},
         r"dataset\.text: row 0 of .*text\.parquet is empty; drop empty texts"),
        (lambda t: {"dataset": _texts(t, ["def", "x"])},
         r"lm\.max_len: 32 tokens is longer than the whole text \(\d+ tokens\); give more text or a smaller lm\.max_len"),
        (lambda t: {"train": {"on_policy": {"fraction": 0.5}}},
         r"train\.on_policy: needs task lm with instruction data .*got dataset\.format text \(no prompts\)"),
        (lambda t: {"train": {"on_policy": {"engine": {"dtype": "bfloat16"}}}},
         r"train\.on_policy: engine: vLLM engine settings apply to sampler vllm only; set sampler: vllm or remove engine"),
        (lambda t: {"train": {"on_policy": {"sampler": "vllm", "engine": {"tensor_parallel_size": 2}}}},
         r"train\.on_policy: engine\.tensor_parallel_size: the on-policy sampler runs on one train worker's device: use 1"),
    ],
    ids=["lm-k-larger-than-vocab", "lm-max-len-beyond-positions", "lm-empty-texts", "lm-text-shorter-than-a-window",
         "on-policy-on-text-data", "on-policy-engine-without-vllm-sampler", "on-policy-vllm-sampler-tensor-parallel"],
)
def test_lm_errors(good, lm_files, tmp_path, capsys, sections, expect):
    _check(capsys, good, tmp_path, _lm_like_good(good, lm_files, tmp_path, **sections(tmp_path)), expect)


_LM_HINT = {"kind": "hint", "teacher": "large", "teacher_layer": 2, "student_layer": 1}


def _lm_features(pool: str = "none", **term):
    """teachers 'large' (2 layers) captures hidden state 2; one train.extra_losses term on it."""
    def change(c: dict, t: Path) -> None:
        c["teachers"][1].update(features=[2], pool=pool)
        c["train"]["extra_losses"] = [{**_LM_HINT, **term}]
    return change


def _lm_on_policy(c: dict, t: Path) -> None:
    train, test = write_instruct_files(t)
    c["dataset"] = {"source": str(train), "test_source": str(test), "format": "prompt_response"}
    c["train"]["on_policy"] = {"fraction": 0.5}


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda c, t: c["teachers"][0].update(features=[5]),
         r"teacher 'small': features index 5 out of range: the model has 2 hidden states \(0 = embeddings \.\. 1\)"),
        (lambda c, t: c["teachers"][0].update(backend="vllm", features=[1]),
         r"teachers\.0: features: backend vllm returns no intermediate features \(teacher 'small'\); remove them"),
        (_lm_features(kind="attention"), r"train\.extra_losses\.0\.kind: attention transfer is for task classification; "
                                         r"task lm takes hint, or rkd_distance / rkd_angle / similarity over pooled"),
        (_lm_features(kind="rkd_distance"), r"train\.extra_losses\.0\.kind: rkd_distance relates samples: task lm needs one "
                                            r"vector per sequence, but teacher 'large' has pool none; set its "
                                            r"teachers\[\]\.pool to mean or cls, or use kind hint"),
        (_lm_features(student_layer=3), r"train\.extra_losses\.0\.student_layer: index 3 out of range: the student has "
                                        r"2 hidden states \(0 = embeddings \.\. 1\)"),
        (lambda c, t: (_lm_features()(c, t), _lm_on_policy(c, t)),
         r"train\.extra_losses: not with train\.on_policy \(the student's sampled sequences have no stored teacher "
         r"features\); remove one of them"),
        (lambda c, t: (_lm_on_policy(c, t), c["train"]["on_policy"].update(sampler="vllm")),
         r"train\.on_policy\.sampler vllm: vLLM on CPU does not support attention head size 8 \(supported: .*\); "
         r"use sampler: hf"),
    ],
    ids=["lm-features-index-out-of-range", "lm-features-on-vllm", "lm-extra-loss-attention", "lm-extra-loss-relation-per-token",
         "lm-extra-loss-student-layer-out-of-range", "lm-extra-loss-with-on-policy",
         "lm-on-policy-vllm-sampler-head-size"],
)
def test_lm_feature_errors(good, lm_files, tmp_path, capsys, change, expect):
    cfg = _lm_like_good(good, lm_files, tmp_path)
    change(cfg, tmp_path)
    _check(capsys, good, tmp_path, cfg, expect)


def _pairs(tmp: Path, fmt: str, rows: list[dict], **keys) -> dict:
    pq.write_table(pa.Table.from_pylist(rows), tmp / "pairs.parquet")
    return {"source": str(tmp / "pairs.parquet"), "format": fmt, "test_fraction": 0.5, **keys}


@pytest.mark.parametrize(
    "dataset, expect",
    [
        (lambda t: _pairs(t, "prompt_response", [{"question": "a?", "response": "b"}] * 4),
         r"dataset\.prompt: column 'prompt' not found in .*pairs\.parquet; available columns: question, response"),
        (lambda t: _pairs(t, "prompt_response", [{"prompt": "a?", "response": "b"}, {"prompt": "c?", "response": ""}]),
         r"dataset\.response: row 1 of .*pairs\.parquet \('response'\) is empty or not a string"),
        (lambda t: _pairs(t, "chat", [{"messages": [{"role": "user", "content": "hi"}]}] * 4),
         r"dataset\.messages: row 0 of .*pairs\.parquet has no assistant turn to learn from"),
        (lambda t: _pairs(t, "prompt_response", [{"prompt": "word " * 40, "response": "b"}] * 4),
         r"lm\.max_len: no example keeps a response token within 32 tokens; raise lm\.max_len or shorten the prompts"),
    ],
    ids=["instruct-missing-prompt-column", "instruct-empty-response", "chat-without-assistant-turn",
         "instruct-prompts-fill-the-window"],
)
def test_instruction_data_errors(good, lm_files, tmp_path, capsys, dataset, expect):
    cfg = _lm_like_good(good, lm_files, tmp_path, dataset=dataset(tmp_path))
    cfg["dataset"].pop("test_source", None)
    _check(capsys, good, tmp_path, cfg, expect)


def test_chat_with_a_tokenizer_without_a_chat_template(good, lm_files, tmp_path, capsys):
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(lm_files["tokenizer"], tok)
    conf = json.loads((tok / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    (tok / "tokenizer_config.json").write_text(json.dumps(conf))
    for extra in tok.glob("chat_template.*"):
        extra.unlink()
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 4
    cfg = _lm_like_good(good, lm_files, tmp_path, dataset=_pairs(tmp_path, "chat", rows), lm={"tokenizer": str(tok)})
    cfg["dataset"].pop("test_source", None)
    _check(capsys, good, tmp_path, cfg, r"dataset\.format: chat needs a chat template, and the tokenizer in .*tok has none")


@pytest.mark.parametrize(
    "engine, expect",
    [
        ({}, r"lm\.max_len: windows of 64 tokens need teacher 'small' max_model_len > 64 \(vLLM adds one generated token; "
             r"it is 64, max_position_embeddings in .*small/config\.json\); set lm\.max_len <= 63"),
        ({"max_model_len": 40}, r"lm\.max_len: windows of 64 tokens need teacher 'small' max_model_len > 64 \(vLLM adds one "
                                r"generated token; it is 40, teachers\[\]\.engine\.max_model_len\); set lm\.max_len <= 39"),
    ],
    ids=["vllm-window-of-all-positions", "vllm-window-beyond-engine-max-model-len"],
)
def test_vllm_window_leaves_no_room_for_the_generated_token(good, lm_files, tmp_path, capsys, engine, expect):
    cfg = _lm_like_good(good, lm_files, tmp_path, lm={"max_len": 64})  # the teachers' max_position_embeddings
    cfg["teachers"][0].update(backend="vllm", engine=engine)
    _check(capsys, good, tmp_path, cfg, expect)


def test_student_vocab_mismatch_is_caught_before_labeling(good, lm_files, tmp_path, capsys):
    student = json.loads(Path(lm_files["student_config"]).read_text())
    # one row short of the tokenizer (a student with more rows is resized to the teachers': tests/test_students.py)
    (tmp_path / "student.json").write_text(json.dumps({**student, "vocab_size": student["vocab_size"] - 1}))
    cfg = _lm_like_good(good, lm_files, tmp_path, lm={"student_config": str(tmp_path / "student.json")})
    _check(capsys, good, tmp_path, cfg, r"lm\.student_config: the student's vocab_size 299 is smaller than the "
                                        r"tokenizer's 300 tokens; the student must predict over the teachers' vocabulary")


def test_gradient_checkpointing_of_a_student_without_it(good, lm_files, tmp_path, capsys):
    """A transformers class that cannot recompute its layers (CTRL here): refused before labeling."""
    ctrl = {"model_type": "ctrl", "vocab_size": 300, "n_embd": 16, "n_layer": 1, "n_head": 2, "dff": 32, "n_positions": 64}
    (tmp_path / "ctrl.json").write_text(json.dumps(ctrl))
    cfg = _lm_like_good(good, lm_files, tmp_path, lm={"student_config": str(tmp_path / "ctrl.json")},
                        train={"gradient_checkpointing": True})
    _check(capsys, good, tmp_path, cfg, r"train\.gradient_checkpointing: the student's CTRLLMHeadModel does not "
                                        r"support it in transformers; remove it")


def test_lm_teachers_with_different_vocabularies(good, lm_files, tmp_path, capsys):
    # Also in tests/test_lm.py (through pipeline.prepare): here through the CLI, at the good store.
    other = make_lm(tmp_path / "other", make_tokenizer(tmp_path / "tok", corpus(6), vocab=280), corpus(6), 32, 1,
                    seed=5, steps=0)
    cfg = _lm_like_good(good, lm_files, tmp_path)
    cfg["teachers"][1]["path"] = str(other)
    _check(capsys, good, tmp_path, cfg,
           r"teachers 'small' and 'large' use different vocabularies \(tokenizer files differ: id 260 is '.*' in "
           r"'large', '.*' in 'small', id 261 .*\); one ensemble needs one tokenizer")


def _custom_tokenizer(src: str, out: Path) -> str:
    """``src`` with a tokenizer class of its own code (tokenizer_config.json's auto_map)."""
    import shutil

    shutil.copytree(src, out)
    conf = json.loads((out / "tokenizer_config.json").read_text())
    conf.update(tokenizer_class="TinyCustomTokenizer", auto_map={"AutoTokenizer": [None, "tok.TinyCustomTokenizer"]})
    (out / "tokenizer_config.json").write_text(json.dumps(conf))
    (out / "tok.py").write_text("from transformers import PreTrainedTokenizerFast\n\n\n"
                                "class TinyCustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    return str(out)


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda c, t: c["teachers"][1].update(path=str(as_remote_code(Path(c["teachers"][1]["path"]), t / "custom"))),
         r"teacher 'large': .*custom is a tiny_custom model whose code is in its dir \(auto_map in config\.json: "
         r"AutoConfig, AutoModelForCausalLM\), not in transformers; set trust_remote_code: true on this teacher if you "
         r"trust that code"),
        (lambda c, t: c["lm"].update(tokenizer=_custom_tokenizer(c["lm"].get("tokenizer") or c["teachers"][0]["path"],
                                                                  t / "tok")),
         r"lm\.tokenizer: the tokenizer in .*tok is its own code \(auto_map in tokenizer_config\.json\), which is not "
         r"run; save the same vocabulary as a standard tokenizer \(tokenizer\.json\) in a dir and set lm\.tokenizer"),
        (lambda c, t: [c["teachers"][1].update(path=str(as_remote_code(Path(c["teachers"][1]["path"]), t / "custom")),
                                              trust_remote_code=True),
                       c["lm"].pop("student_config"),
                       c.update(student={"init": "teacher", "teacher": "large", "layers": [0]})],
         r"student\.path: .*custom is a tiny_custom model whose code is in its dir \(auto_map\), not in transformers; "
         r"a student must be an architecture transformers ships"),
    ],
    ids=["teacher-code-without-trust", "tokenizer-with-its-own-code", "student-from-a-teacher-with-its-own-code"],
)
def test_remote_code_errors(good, lm_files, tmp_path, capsys, change, expect):
    cfg = _lm_like_good(good, lm_files, tmp_path)
    change(cfg, tmp_path)
    _check(capsys, good, tmp_path, cfg, expect)


def _quantized(src: str, out: Path) -> str:
    """``src`` as an AWQ checkpoint says it is (config.json's quantization_config)."""
    import shutil

    shutil.copytree(src, out)
    conf = json.loads((out / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (out / "config.json").write_text(json.dumps(conf))
    return str(out)


def test_student_from_a_quantized_checkpoint(good, lm_files, tmp_path, capsys):
    """A student trains full-precision weights: a quantized dir is refused before any work."""
    cfg = _lm_like_good(good, lm_files, tmp_path)
    cfg["lm"].pop("student_config")
    cfg["student"] = {"init": "pretrained", "path": _quantized(cfg["teachers"][1]["path"], tmp_path / "awq")}
    _check(capsys, good, tmp_path, cfg,
           r"student\.path: .*awq is quantized \(awq in config\.json\); a student "
           r"trains full-precision weights: give the unquantized checkpoint of the same model")


def test_student_with_another_tokenizer(good, lm_files, tmp_path, capsys):
    """A pretrained student whose tokenizer reads other tokens at the ensemble's ids (another model
    family of a large enough vocab_size, which no size check catches) is refused before any work."""
    import shutil

    from tests.helpers_lm import corpus, make_tokenizer

    cfg = _lm_like_good(good, lm_files, tmp_path)
    cfg["lm"].pop("student_config")
    student = tmp_path / "other-family"
    shutil.copytree(cfg["teachers"][1]["path"], student)
    make_tokenizer(student, [t[::-1].upper() for t in corpus()])  # other merges, saved over the teacher's files
    cfg["student"] = {"init": "pretrained", "path": str(student)}
    _check(capsys, good, tmp_path, cfg,
           r"student\.path: .*other-family has another tokenizer than the ensemble's \(.*small\): [\d,]+ of 300 "
           r"shared ids are other tokens \(id \d+ is .* in the student's, .* in the ensemble's\), so its "
           r"pretrained embeddings would learn other tokens' ids; use a student of the teachers' tokenizer family")


# ---- `distill generate` (task lm prompts; checked before any teacher is deployed) ----------


def _no_eos_teacher(lm_files: dict, tmp: Path) -> str:
    """The `small` teacher with every end-of-sequence token removed (config, generation config, tokenizer)."""
    import shutil

    path = tmp / "no-eos"
    shutil.copytree(lm_files["teachers"]["small"], path)
    (path / "generation_config.json").unlink(missing_ok=True)
    for name, key in (("config.json", "eos_token_id"), ("tokenizer_config.json", "eos_token")):
        conf = json.loads((path / name).read_text())
        conf[key] = None
        (path / name).write_text(json.dumps(conf))
    return str(path)


def _no_prompts(t: Path) -> dict:
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), t / "pairs.parquet")
    return {"source": str(t / "pairs.parquet"), "format": "prompt_response"}


def _gen_no_eos(t: Path, lm_files: dict) -> dict:
    return {"teachers": [{"name": "mute", "backend": "hf", "path": _no_eos_teacher(lm_files, t)}],
            "dataset": _pairs(t, "prompt_response", [{"prompt": "a?"}])}


@pytest.mark.parametrize(
    "sections, expect",
    [
        (lambda t, f: {"generate": {"n": 0}, "dataset": _pairs(t, "prompt_response", [{"prompt": "a?"}])},
         r"generate\.n: Input should be greater than or equal to 1 \(got 0\)"),
        (lambda t, f: {"generate": {"max_new_tokens": 8}, "dataset": _pairs(t, "prompt_response", [{"prompt": "a?"}, {"prompt": "word " * 40}])},
         r"dataset\.prompt: prompt \w+ \(row 1\) is \d+ tokens, and with generate\.max_new_tokens 8 it does not fit "
         r"lm\.max_len 32; shorten or drop it, lower generate\.max_new_tokens, or raise lm\.max_len"),
        (lambda t, f: {"dataset": _no_prompts(t)},
         r"dataset\.source: .*pairs\.parquet has no prompts to generate for; give it at least one row"),
        (_gen_no_eos,
         r"teacher 'mute': no end-of-sequence token \(eos_token_id in .*no-eos/generation_config\.json or config\.json, "
         r"or the tokenizer's eos_token\), so its responses could never end; set one"),
        (lambda t, f: {},
         r"dataset\.format: distill generate needs prompts: task lm with format prompt_response or chat \(got task lm, format text\)"),
        (lambda t, f: {"generate": {"include_reference": True, "max_new_tokens": 8}, "dataset": _pairs(t, "prompt_response", [{"prompt": "a?"}])},
         r"generate\.include_reference: .*pairs\.parquet has no 'response' column \(dataset\.response\) with the reference "
         r"answers; add it or set include_reference false"),
    ],
    ids=["generate-n-zero", "generate-prompt-longer-than-max-len", "generate-empty-prompt-set", "generate-teacher-without-eos",
         "generate-on-text-data", "generate-include-reference-without-answers"],
)
def test_generate_errors(good, lm_files, tmp_path, capsys, sections, expect):
    """`distill generate`: exit 2, one line, the good run dir (where OUTPUT would be) unchanged."""
    cfg = _lm_like_good(good, lm_files, tmp_path, **sections(tmp_path, lm_files))
    if cfg["dataset"].get("format"):
        cfg["dataset"].pop("test_source", None)
    capsys.readouterr()
    code = main(["generate", str(write_yaml(tmp_path / "bad.yaml", cfg))])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert re.search(expect, err), err
    assert _snapshot(good.run_dir) == good.files  # no generated/ folder, nothing else touched


# ---- teachers' outputs: only known once they run, on Serve ----------------------------------


NON_FINITE = (r"teacher 'broken' returned NaN/Inf for \d+ rows of shard \d+ \(first: sample_id \w+\); "
              r"nothing was written for this shard")


def _bad_rows(store: LabelStore, shard: int):
    return features_of(store.read_inputs(shard))[:, 5] > 12  # where NaNTeacher / InfTeacher misbehave


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda p: save_script(NaNTeacher(), p), NON_FINITE),
        (lambda p: save_script(InfTeacher(), p), NON_FINITE),
        (lambda p: save_script(train_tiny(0, seed=3, num_classes=9, steps=5), p),
         r"teachers disagree on the number of classes: 'broken' has 9, 'linear' has 10"),
    ],
    ids=["teacher-nan", "teacher-inf", "teachers-different-class-counts"],
)
def test_bad_teacher_outputs(good, tmp_path, capsys, make, expect):
    cfg = _like_good(good, _teacher(1, name="broken", path=str(make(tmp_path / "broken.pt"))))
    # At the good store: refused before any teacher runs, since other teachers built it.
    err = _refused(capsys, good, write_yaml(tmp_path / "bad.yaml", cfg))
    assert "store has teachers ['linear', 'mlp'], config has ['broken', 'linear']" in err, err
    # At a new store of the same run: the teacher's own fault, and no shard it spoiled.
    cfg["store"]["path"] = str(tmp_path / "store")
    err = _check(capsys, good, tmp_path, cfg, expect)
    store = LabelStore(cfg["store"]["path"])
    if "classes" in expect:  # found on the probe row: the store is never created
        assert not store.exists()
        return
    store.load_manifest()
    done = store.finished_shards()
    assert len(done) < store.num_shards
    assert not any(_bad_rows(store, i).any() for i in done)


def test_features_of_another_width_than_the_teachers(good, tmp_path, capsys):
    cfg = _like_good(good, _section("dataset", limit=None, source=_parquet(tmp_path, _rows(20, width=10))))
    # At the good store: refused by its identity (the width is only known to clash once a teacher runs).
    err = _refused(capsys, good, write_yaml(tmp_path / "bad.yaml", cfg))
    assert "dataset.feature_dim: store 64 vs config 10" in err, err
    cfg["store"]["path"] = str(tmp_path / "store")
    _check(capsys, good, tmp_path, cfg, r"teacher 'linear': fails on rows of 10 features .*check that dataset\.features")


# ---- python -m jobs.self_distill: checked before any generation runs ---------------------------


@pytest.mark.parametrize("args, lm, expect", [
    (["--generations", "0"], False, r"--generations: must be 1 or more \(got 0\)"),
    (["--generations", "two"], False, r"--generations: expected a whole number, got 'two'"),
    ([], True, r"task: self-distillation serves each generation's student as the next one's teacher, .*not task lm"),
], ids=["self-distill-zero-generations", "self-distill-generations-not-a-number", "self-distill-lm-student"])
def test_self_distill_errors(good, lm_files, tmp_path, capsys, args, lm, expect):
    from jobs.self_distill import main as self_distill

    cfg = _lm_like_good(good, lm_files, tmp_path) if lm else _like_good(good)
    capsys.readouterr()
    code = self_distill([str(write_yaml(tmp_path / "bad.yaml", cfg)), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert re.search(expect, err), err
    assert _snapshot(good.run_dir) == good.files
    assert not list(good.run_dir.parent.glob("*_gen*"))  # no generation started
