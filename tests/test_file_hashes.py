"""orchestrator/file_hashes.py: a teacher dir's content hash, cached by its files' stat. No Ray."""
from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from orchestrator import file_hashes
from orchestrator.file_hashes import hash_files
from orchestrator.models import teacher_fingerprint

WEIGHTS = 3 << 20  # more than one read block


def reference(path, prefix: bytes) -> str:
    """The definition, uncached: the prefix, then each (non-hidden) file's relative path and bytes."""
    h = hashlib.sha256(prefix)
    if path.is_file():
        return hashlib.sha256(prefix + path.read_bytes()).hexdigest()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if not any(part.startswith(".") for part in rel.parts):
            h.update(rel.as_posix().encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def teacher(tmp_path, monkeypatch):
    """A teacher dir whose files are older than RACY_S (so their hash may be cached)."""
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DISTILL_FINGERPRINT_CACHE", raising=False)
    d = tmp_path / "teacher"
    (d / "code").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "model.safetensors").write_bytes(os.urandom(WEIGHTS))
    (d / "code" / "modeling.py").write_text("pass\n")
    time.sleep(file_hashes.RACY_S + 0.1)
    return d


def read_during(fn) -> int:
    before = file_hashes.hashed_bytes
    fn()
    return file_hashes.hashed_bytes - before


def test_cached_hash_equals_the_definition_and_reads_nothing(teacher):
    want, size = reference(teacher, b"spec"), WEIGHTS + len('{"model_type": "llama"}') + len("pass\n")
    assert read_during(lambda: hash_files(teacher, b"spec")) == size
    assert hash_files(teacher, b"spec") == want
    assert read_during(lambda: hash_files(teacher, b"spec")) == 0  # from the cache
    assert hash_files(teacher, b"other") == reference(teacher, b"other") != want  # the prefix is part of the key


def test_a_rewritten_file_is_hashed_again(teacher):
    first = hash_files(teacher, b"spec")
    (teacher / "model.safetensors").write_bytes(os.urandom(WEIGHTS))  # same size, same inode, new bytes
    assert hash_files(teacher, b"spec") == reference(teacher, b"spec") != first
    # just written: its timestamps may not tell the next write apart, so this hash is not cached
    assert read_during(lambda: hash_files(teacher, b"spec")) > WEIGHTS


def test_hidden_entries_are_not_part_of_the_model(teacher):
    first = hash_files(teacher, b"spec")
    (teacher / ".cache" / "huggingface").mkdir(parents=True)
    (teacher / ".cache" / "huggingface" / "model.safetensors.metadata").write_text("etag, 1764720000")
    (teacher / ".gitattributes").write_text("*.safetensors filter=lfs")
    assert read_during(lambda: hash_files(teacher, b"spec")) == 0 and hash_files(teacher, b"spec") == first


def test_no_cache_when_unwritable_or_turned_off(teacher, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "a_file"))  # cannot hold a dir
    assert hash_files(teacher, b"spec") == reference(teacher, b"spec")
    assert read_during(lambda: hash_files(teacher, b"spec")) > WEIGHTS
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DISTILL_FINGERPRINT_CACHE", "0")
    hash_files(teacher, b"spec")
    assert read_during(lambda: hash_files(teacher, b"spec")) > WEIGHTS


def test_teacher_fingerprint_keeps_its_definition(teacher, tmp_path):
    """Stores built before the cache keep their identity: the fingerprint is the same hash."""
    cfg = {"name": "t", "backend": "hf", "path": str(teacher)}
    spec = json.dumps({"backend": "hf", "module": None, "kwargs": None}, sort_keys=True).encode()
    assert teacher_fingerprint(cfg) == reference(teacher, spec)[:16]
    one = tmp_path / "t.pt"  # a torch teacher is one file
    import torch

    torch.save({"w": torch.ones(2)}, one)
    spec = json.dumps({"backend": "torch", "module": None, "kwargs": None}, sort_keys=True).encode()
    assert teacher_fingerprint({"name": "t", "backend": "torch", "path": str(one)}) == reference(one, spec)[:16]
