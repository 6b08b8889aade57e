"""The ensemble's one vocabulary: which teachers' tokenizers can share it (check_vocabulary), its
size when checkpoints pad theirs differently, and a pretrained student's tokenizer checked
against it. Pure torch: no Ray.

Checkpoints round vocab_size up past their tokenizer for fast matmuls, by different amounts:
Qwen2.5 0.5B-3B have 151,936 rows, 7B-72B 152,064, all over the same 151,665 tokens. Teachers
that share a tokenizer may differ in those padding rows, which no token id reaches, and a student
from another size of the family too. The ensemble predicts over the widest teacher's rows (a
narrower one lists none of the extra ids in its top-k; its tail is spread over a few more ids than
it has, a relative error of (rows difference) / V in the tail's per-id mass); the student is
resized to them (students.check_student_vocab, build_lm_student); no sampler writes an id past
the tokenizer (generation.sample's vocab_limit; vllm_teacher.vocab_ban for vLLM teachers and the
vLLM student sampler), so every teacher can read every sampled token.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("distill")


def ensemble_vocab(cfg, tokens: int) -> int | None:
    """The ensemble's vocabulary size: the widest teacher's vocab_size (tokens: the tokenizer's token
    count, for the log line)."""
    sizes = {t.name: json.loads((Path(t.path) / "config.json").read_text()).get("vocab_size") for t in cfg.teachers}
    known = [v for v in sizes.values() if isinstance(v, int)]
    vocab = max(known) if known else None
    if len(set(known)) > 1:
        log.info("prepare: the teachers' vocab_size differ (%s) over the tokenizer's %d tokens: padding rows; the "
                 "ensemble predicts over the widest, %d ids", ", ".join(f"{n} {v}" for n, v in sizes.items()), tokens, vocab)
    return vocab


@torch.no_grad()
def resize_vocab(model, vocab_size: int) -> None:
    """Resize a causal LM's embeddings and head to ``vocab_size`` rows. Rows past the tokenizer are
    padding: cut ones are never read, and new ones start as the mean of the old rows (an average
    token's embedding, so their logits start where an average token's do), the same on every rank
    (transformers' own mean resizing samples them)."""
    old = model.get_input_embeddings().weight.shape[0]
    means = [m.weight.float().mean(0) for m in (model.get_input_embeddings(), model.get_output_embeddings())
             if m is not None]
    bias = getattr(model.get_output_embeddings(), "bias", None)
    bias_mean = None if bias is None else bias.float().mean()
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    if vocab_size > old:
        for m, mean in zip((model.get_input_embeddings(), model.get_output_embeddings()), means):
            m.weight[old:] = mean.to(m.weight.dtype)  # a tied head is the same tensor: the same mean
        if bias_mean is not None:
            model.get_output_embeddings().bias[old:] = bias_mean


_VOCABS: dict[tuple, tuple] = {}  # (resolved dir, its tokenizer files' hash) -> read_vocab's result


def read_vocab(path: str | Path, field: str = "lm.tokenizer") -> tuple[dict[int, str], frozenset[int]]:
    """A from_pretrained dir's tokenizer as (id -> token, the added / special ids); read once per
    process while its files stay the same (field: named in a load error)."""
    from .models import load_tokenizer, tokenizer_hash

    key = (str(Path(path).resolve()), tokenizer_hash(path))
    if key not in _VOCABS:
        tok = load_tokenizer(path, field)
        if len(_VOCABS) >= 8:  # a few maps at most (a 150k-token one is tens of MB)
            _VOCABS.pop(next(iter(_VOCABS)))
        _VOCABS[key] = {i: t for t, i in tok.get_vocab().items()}, frozenset(tok.added_tokens_decoder)
    return _VOCABS[key]


def vocab_mismatch(ours: tuple, theirs: tuple) -> tuple[list[int], list[int], list[int]]:
    """Two read_vocab results -> (ids both have as other regular tokens: they read text
    differently; ids both have as other special tokens: a family's versions renaming a reserved
    token, as Llama 3.1 did; ids only ``theirs`` has: tokens added past ``ours``, as Qwen3's
    <think> past Qwen2.5's 151,665)."""
    (a, a_special), (b, b_special) = ours, theirs
    renamed = sorted(i for i in a.keys() & b.keys() if a[i] != b[i])
    special = [i for i in renamed if i in a_special and i in b_special]
    return [i for i in renamed if i not in special], special, sorted(b.keys() - a.keys())


def _example(ids: list[int], a: dict, b: dict, names: tuple[str, str]) -> str:
    """Up to two ids as 'id 260 is 'Ġt' in A, 'Ġa' in B'."""
    return ", ".join(f"id {i} is {a.get(i)!r} in {names[0]}, {b.get(i)!r} in {names[1]}" for i in ids[:2])


def ensemble_tokenizer(cfg) -> str:
    """The dir the ensemble tokenizes with: lm.tokenizer, else the teachers' tokenizer when they
    share one, else the one with the fewest ids (every teacher reads all of its ids; check_vocabulary
    says whether they may differ at all)."""
    from .models import tokenizer_hash

    if cfg.lm.tokenizer:
        return cfg.lm.tokenizer
    dirs = [t.path for t in cfg.teachers if tokenizer_hash(t.path) is not None] or [cfg.teachers[0].path]
    if len({tokenizer_hash(d) for d in dirs}) == 1:
        return dirs[0]
    return min(dirs, key=lambda d: len(read_vocab(d)[0]))  # the first of the narrowest, in config order


def check_vocabulary(cfg) -> str:
    """One vocabulary per ensemble: every teacher must read each of the ensemble tokenizer's ids as
    the same token. Accepted: the same files; files that differ in bytes only (a fine-tune's
    re-save); one family's versions, whose regular tokens agree and which differ only in renamed
    special ids or in tokens one adds past the other's (Qwen3 beside Qwen2.5 teachers): the
    ensemble then tokenizes with the narrowest (ensemble_tokenizer), and no sampler writes past it.
    Anything else is refused in one line. Returns the ensemble's tokenizer dir."""
    from .errors import DistillError
    from .models import tokenizer_hash

    hashes = {t.name: tokenizer_hash(t.path) for t in cfg.teachers}
    missing = [n for n, h in hashes.items() if h is None]
    if missing and not cfg.lm.tokenizer:
        raise DistillError(f"teacher '{missing[0]}': no tokenizer files in its dir; set lm.tokenizer")
    tok_dir = ensemble_tokenizer(cfg)
    ref = tokenizer_hash(tok_dir)
    if ref is None:
        raise DistillError(f"lm.tokenizer: no tokenizer files in {tok_dir}")
    paths, order = {t.name: t.path for t in cfg.teachers}, [t.name for t in cfg.teachers]
    owner = None if cfg.lm.tokenizer else next(n for n in order if paths[n] == tok_dir)  # None: lm.tokenizer
    for name in [n for n in order if hashes[n] not in (None, ref)]:
        ours, theirs = read_vocab(tok_dir), read_vocab(paths[name], f"teacher '{name}'")
        regular, special, extra = vocab_mismatch(theirs, ours)  # `extra`: ensemble ids this teacher lacks
        labels = (f"'{owner}'" if owner else "lm.tokenizer", f"'{name}'")
        if regular or extra:
            detail = _example(regular or extra, ours[0], theirs[0], labels)
            if owner is None:
                raise DistillError(f"lm.tokenizer {tok_dir} differs from teacher '{name}' tokenizer ({detail})")
            a, b = sorted((owner, name), key=order.index)
            raise DistillError(f"teachers '{a}' and '{b}' use different vocabularies (tokenizer files differ: "
                               f"{detail}); one ensemble needs one tokenizer")
        if not special and len(theirs[0]) == len(ours[0]):
            log.info("prepare: the tokenizer files of %s and %s differ, but map every id to the same token; the "
                     "ensemble tokenizes with %s", tok_dir, paths[name], tok_dir)
            continue
        log.info("prepare: teacher '%s' reads the %d ids of the ensemble's tokenizer (%s) as the same tokens%s; "
                 "its %d ids past them are never written (no sampler goes past the ensemble's tokenizer)", name,
                 len(ours[0]), tok_dir, f" but for {len(special)} renamed special ids "
                 f"({_example(special, ours[0], theirs[0], labels)})" if special else "",
                 len(theirs[0]) - len(ours[0]))
    return tok_dir


def check_student_tokenizer(spec: dict, tok_dir: str | Path, field: str = "student.path") -> None:
    """spec: the student's (orchestrator.prepare.lm_student_spec). A pretrained student's embeddings
    are indexed by its own tokenizer's ids; it trains on the ensemble tokenizer's. If the two read
    regular ids as other tokens (Llama-3 teachers, a Qwen student: both V >= 128k, so no size check
    notices), every row would be trained as another token's and the pretraining is lost: refused
    in one line. Ids only the ensemble has become new rows, and renamed special ids are logged."""
    from .errors import DistillError
    from .models import tokenizer_files, tokenizer_hash

    student_dir = spec.get("path")
    if spec["init"] == "scratch" or Path(student_dir).resolve() == Path(tok_dir).resolve() \
            or not tokenizer_files(student_dir) or tokenizer_hash(student_dir) == tokenizer_hash(tok_dir):
        return  # no tokenizer beside the weights: nothing to compare with (its config's vocab_size is checked)
    ours, theirs = read_vocab(student_dir, field), read_vocab(tok_dir)
    regular, special, extra = vocab_mismatch(ours, theirs)
    names = ("the student's", "the ensemble's")
    if regular:
        shared = len(ours[0].keys() & theirs[0].keys())
        raise DistillError(f"{field}: {student_dir} has another tokenizer than the ensemble's ({tok_dir}): "
                           f"{len(regular):,} of {shared:,} shared ids are other tokens "
                           f"({_example(regular[len(regular) // 2:][:1], ours[0], theirs[0], names)}), so its "
                           "pretrained embeddings would learn other tokens' ids; use a student of the teachers' "
                           "tokenizer family, student.init teacher, or a student from scratch (distilling across "
                           "tokenizers is not supported)")
    if special or extra:
        log.info("prepare: %s's tokenizer reads the ensemble's ids (%s) as the same tokens%s; %d ids only the "
                 "ensemble has become new rows", student_dir, tok_dir, f" but for {len(special)} renamed special ids "
                 f"({_example(special, ours[0], theirs[0], names)})" if special else "", len(extra))
