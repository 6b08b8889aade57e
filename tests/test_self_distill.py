"""Born-again self-distillation (orchestrator/self_distill.py, jobs/self_distill.py).

Unit checks (no Ray) build each generation's config and the served teacher of an MLP student.
The slow tests run two generations end to end on real Ray: generation 2's store is labeled by
generation 1's trained student served through Serve (its soft labels are that student's
softened outputs), the combined report lists both, and a re-run skips both.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jobs.self_distill import main as self_distill
from orchestrator.config import config_from_dict
from orchestrator.datasets import features_of
from orchestrator.errors import DistillError
from orchestrator.evaluate import student_predictor
from orchestrator.models import ClassifierTeacher, MLPStudent, teacher_fingerprint
from orchestrator.self_distill import check_self_distill, finished, generation_config, served_teacher
from orchestrator.store import SOFT_COLUMN, LabelStore
from tests.helpers import tiny_config, write_yaml

# A 1-layer, 16-wide BERT over the digits' pixel values (0..16) as token ids.
TINY_BERT = {"model_type": "bert", "vocab_size": 17, "hidden_size": 16, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64,
             "type_vocab_size": 1, "num_labels": 10}


def _hf_student(tmp) -> dict:
    (tmp / "student.json").write_text(json.dumps(TINY_BERT))
    return {"arch": "hf", "init": "scratch", "config": str(tmp / "student.json")}


def _cfg(tmp, teachers, arch: str, **sections) -> dict:
    cfg = tiny_config(tmp, teachers, dataset={"limit": 300}, train={"epochs": 2, "batch_size": 32}, **sections)
    if arch == "hf":
        cfg["student"] = _hf_student(tmp)
    return cfg


# ---- each generation's config (no Ray) ----------------------------------------------------------


def test_generation_1_learns_from_hard_labels_or_the_teachers(tmp_path):
    base = config_from_dict(tiny_config(tmp_path, {"a": "a.pt"}, train={"alpha": 0.3}))
    hard = generation_config(base, 1)
    assert (hard.run.name, hard.train.loss, hard.train.alpha, hard.eval.baseline) == ("tiny_gen1", "kd", 1.0, False)
    assert [t.name for t in hard.teachers] == ["a"]  # they still label its store
    taught = generation_config(base, 1, "teachers")
    assert (taught.train.alpha, taught.eval.baseline) == (0.3, False)  # as written (tiny_config: no baseline)


def test_generation_2_is_taught_by_generation_1s_export_only(tmp_path):
    base = config_from_dict({**_cfg(tmp_path, {"a": "a.pt"}, "hf", store={"path": str(tmp_path / "s")}),
                             "eval": {"baseline": True}})
    g1 = generation_config(base, 1)
    g2 = generation_config(base, 2, prev=g1)
    assert g2.run.name == "tiny_gen2" and not g2.eval.baseline
    assert g2.store.path == str(tmp_path / "s_gen2") and g1.store.path == str(tmp_path / "s_gen1")
    assert [t.model_dump(include={"name", "backend", "path"}) for t in g2.teachers] == [
        {"name": "gen1", "backend": "hf", "path": str((g1.run_dir / "students" / "student").resolve())}]
    assert g2.student == base.student and g2.train == base.train  # same student, same budget and loss


def test_a_student_kept_from_a_teacher_restarts_from_the_same_weights(tmp_path):
    from orchestrator.cls_students import build_cls_student
    from tests.test_cls_students import TINY, save_teacher

    path, _ = save_teacher(tmp_path, {**TINY["bert"], "vocab_size": 17})
    cfg = tiny_config(tmp_path, {}, student={"arch": "hf", "init": "teacher", "teacher": "bert", "layers": [2, 0]})
    del cfg["student"]["hidden"]
    cfg["teachers"] = [{"name": "bert", "backend": "hf", "path": str(path)}]
    base = config_from_dict(cfg)
    g2 = generation_config(base, 2, prev=generation_config(base, 1))
    assert (g2.student.init, g2.student.teacher, g2.student.layers) == ("pretrained", None, None)
    assert [t.name for t in g2.teachers] == ["gen1"]
    a = build_cls_student({"arch": "hf", **g2.student_spec_source}).state_dict()
    b = build_cls_student({"arch": "hf", **base.student_spec_source}).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_mlp_student_is_served_by_the_torch_backend(tmp_path):
    """students/student.pt -> a state_dict file + orchestrator.models:MLPStudent, whose served
    logits are the trained student's."""
    torch.manual_seed(0)
    spec = {"arch": "mlp", "in_dim": 64, "num_classes": 10, "hidden": [8], "mean": [3.0] * 64, "std": [5.0] * 64}
    model = MLPStudent(64, 10, [8], spec["mean"], spec["std"])
    prev = config_from_dict(tiny_config(tmp_path, {"a": "a.pt"}))
    (prev.run_dir / "students").mkdir(parents=True)
    torch.save({"spec": spec, "model": model.state_dict(), "optimizer": {}}, prev.run_dir / "students" / "student.pt")
    entry = served_teacher(prev, "gen1", prev.teachers[0])
    assert entry["backend"] == "torch" and entry["module"] == "orchestrator.models:MLPStudent"
    fp = teacher_fingerprint(entry)
    assert teacher_fingerprint(served_teacher(prev, "gen1", prev.teachers[0])) == fp  # rewritten: same bytes
    x = np.random.default_rng(0).integers(0, 17, (5, 64)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_array_equal(ClassifierTeacher(entry)(x), model.eval()(torch.from_numpy(x)).numpy())


@pytest.mark.parametrize("generations, change, expect", [
    (0, lambda c: None, r"--generations: must be 1 or more \(got 0\)"),
    (2, lambda c: c.update(teachers=[{"name": "m", "backend": "torch", "path": "m.pt", "module": "tests.helpers:TinyMLP",
                                   "features": ["net.0"]}],
                        train={**c["train"], "extra_losses": [{"kind": "rkd_distance", "teacher": "m",
                                                               "teacher_layer": "net.0", "student_layer": 0}]}),
     r"train\.extra_losses: generations 2\+ learn from one served student"),
], ids=["zero-generations", "extra-losses"])
def test_what_cannot_self_distil_is_refused(tmp_path, generations, change, expect):
    cfg = tiny_config(tmp_path, {"a": "a.pt"})
    change(cfg)
    with pytest.raises(DistillError, match=expect):
        check_self_distill(config_from_dict(cfg), generations)


def test_no_report_is_not_finished(tmp_path):
    assert not finished(generation_config(config_from_dict(tiny_config(tmp_path, {"a": "a.pt"})), 1))


# ---- two generations on real Ray ----------------------------------------------------------------


@pytest.mark.slow
# arch mlp (extended): served by the torch backend, whose conversion
# test_an_mlp_student_is_served_by_the_torch_backend above checks without Ray.
@pytest.mark.parametrize("arch", ["hf", pytest.param("mlp", marks=pytest.mark.extended)])
def test_generation_2_learns_from_generation_1_served(ray_local, teachers, tmp_path, capsys, arch):
    path = write_yaml(tmp_path / "c.yaml", _cfg(tmp_path, teachers, arch))
    assert self_distill([str(path), "--generations", "2", "-q"]) == 0
    base = config_from_dict(_cfg(tmp_path, teachers, arch))
    g1, g2 = (base.run_dir.with_name(f"tiny_gen{g}") for g in (1, 2))
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (g1, g2))

    # Generation 2's store was labeled by generation 1's student alone, as served.
    served = r2["config"]["teachers"]
    assert [(t["name"], t["backend"]) for t in served] == [("gen1", "hf" if arch == "hf" else "torch")]
    assert served[0]["path"] == str((g1 / "students" / ("student" if arch == "hf" else "student.state_dict.pt")).resolve())
    store = LabelStore(str(g2 / "store"))
    manifest = store.load_manifest()
    assert [(t["name"], t["fingerprint"]) for t in manifest["teachers"]] == [("gen1", teacher_fingerprint(served[0]))]
    # ... and its soft labels are generation 1's trained student softened at T.
    state = torch.load(g1 / "students" / "student.pt", map_location="cpu", weights_only=False)
    predict, _ = student_predictor(state)
    rows = store.read_table(["features", SOFT_COLUMN])
    x = features_of(rows)
    soft = torch.softmax(torch.from_numpy(predict(x)) / base.ensemble.temperature, -1).numpy()
    np.testing.assert_allclose(np.stack(rows.column(SOFT_COLUMN).to_numpy(zero_copy_only=False)), soft, atol=2e-3)
    # Served, generation 1 scores what it scored as a student.
    assert r2["models"]["gen1"]["accuracy"] == r1["models"]["student"]["accuracy"]

    combined = json.loads((base.run_dir / "self_distill.json").read_text())
    assert [(g["model"], g["learned_from"], g["accuracy"]) for g in combined["generations"]] == [
        ("gen1", "hard labels", r1["models"]["student"]["accuracy"]), ("gen2", "gen1", r2["models"]["student"]["accuracy"])]
    assert {m["model"] for m in combined["generation1_others"]} == {"linear", "mlp", "ensemble"}
    md = (base.run_dir / "self_distill.md").read_text()
    assert "| gen1 | student | hard labels |" in md and "| gen2 | student | gen1 |" in md

    # A re-run skips both generations: nothing of theirs is rewritten.
    before = {p: p.stat().st_mtime_ns for d in (g1, g2) for p in d.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert self_distill([str(path), "--generations", "2"]) == 0
    assert "| gen2 | student | gen1 |" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for d in (g1, g2) for p in d.rglob("*") if p.is_file()} == before
