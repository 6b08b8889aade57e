"""Content hashes of teacher dirs, cached by the files' stat. Pure stdlib: no Ray, no torch.

A teacher's fingerprint hashes every file of its dir (weights, config, tokenizer, code), so a
store is never reused for other weights. At 70B that is ~140 GB: minutes at disk speed (SHA-256
runs at ~1.3 GiB/s on one core here), on every run, in the driver and again in each replica.
So the digest is cached, keyed by the dir's real path, the hashed prefix and every file's
(relative path, size, mtime, ctime, inode): a file written, replaced or copied over changes its
ctime (which no tool can set back) and is hashed again. Files changed within RACY_S of hashing
are not trusted to the cache (timestamps are coarse: a write in the same tick would keep them;
git's "racily clean" rule).

Cache: $DISTILL_CACHE_DIR, else $XDG_CACHE_HOME/distill, else ~/.cache/distill, one small file
per key under fingerprints/. Not writable: no cache, the same hashes. DISTILL_FINGERPRINT_CACHE=0
always re-hashes. Hidden entries (names starting with '.': .git, the hub client's .cache/) are
not part of a model and are skipped: they change without the weights changing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger("distill")

RACY_S = 2.0
BLOCK = 1 << 20
hashed_bytes = 0  # bytes read and hashed by this process (tests, benchmarks)


def files_of(path: Path) -> list[Path]:
    """Every file of a dir, sorted, hidden entries skipped; a file is itself."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def cache_dir() -> Path:
    root = os.environ.get("DISTILL_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distill"
    return Path(root) / "fingerprints"


def hash_files(path: Path, prefix: bytes, who: str = "") -> str:
    """sha256(prefix, then for each file of ``path``: its relative path (dirs only) and bytes), hex.

    Cached as the module docstring says; the value is the same with or without the cache."""
    global hashed_bytes
    files = files_of(path)
    stats = [f.stat() for f in files]
    listing = [[f.relative_to(path).as_posix() if path.is_dir() else "", s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino]
               for f, s in zip(files, stats)]
    key = hashlib.sha256(json.dumps([str(path.resolve()), prefix.hex(), listing]).encode()).hexdigest()
    use_cache = os.environ.get("DISTILL_FINGERPRINT_CACHE", "1") != "0"
    entry = cache_dir() / key
    if use_cache:
        try:
            cached = entry.read_text().strip()
            if len(cached) == 64 and all(c in "0123456789abcdef" for c in cached):
                return cached
        except OSError:
            pass
    started, h = time.time(), hashlib.sha256(prefix)
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(BLOCK), b""):
                h.update(block)
                hashed_bytes += len(block)
    digest, took, size = h.hexdigest(), time.time() - started, sum(s.st_size for s in stats)
    if took > 5:
        log.info("fingerprint: %s: hashed %.1f GiB in %.0f s (cached in %s until a file changes)",
                 who or path, size / 2**30, took, cache_dir())
    racy = any(s.st_ctime_ns / 1e9 > started - RACY_S or s.st_mtime_ns / 1e9 > started - RACY_S for s in stats)
    if use_cache and not racy:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=entry.parent, delete=False) as tmp:
                tmp.write(digest)
            os.replace(tmp.name, entry)  # whole or absent, for replicas hashing at once
        except OSError as e:
            log.debug("fingerprint: no cache (%s)", e)
    return digest
