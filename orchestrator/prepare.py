"""Stage 0, prepare (no Ray): load and split the dataset, tokenize it for LMs, and build the
identity a store must have been built from (dataset + teacher fingerprints), in one place."""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa

from .config import DistillConfig
from .datasets import (content_ids, features_of, fingerprint, load_dataset, load_labeled_text, load_text, make_table,
                       pack, pad_tokens, split_indices, token_table)
from .errors import DistillError
from .feature_capture import check_layers
from .instruct import example_table, load_examples, pack_examples, tokenize_examples
from .models import (check_lm_limits, load_tokenizer, same_vocabulary, teacher_fingerprint, tokenizer_files,
                     tokenizer_hash, _check_positions)
from .store import SCHEMA_VERSION
from .vocab import check_student_tokenizer, check_vocabulary, ensemble_vocab

log = logging.getLogger("distill")


@dataclass
class Prepared:
    train: pa.Table  # canonical rows + `row`, the split that is labeled and trained on
    test: pa.Table  # held out for evaluation only
    identity: dict  # what the store must have been built from
    ensemble: dict  # mode, temperature, tau, weights per teacher
    tokenizer: str | None = None  # task lm: the ensemble's one tokenizer dir (exported with the student)

    @cached_property
    def test_fingerprint(self) -> str:
        """Content hash of the held-out split (keys the teachers' cached held-out scores)."""
        return fingerprint(self.test)


def prepare(cfg: DistillConfig) -> Prepared:
    train, test, dataset, label_kind, tokenizer = (_lm_split if cfg.task == "lm" else _classification_split)(cfg)
    train = train.append_column("row", pa.array(np.arange(train.num_rows), pa.int64()))
    if cfg.train.gradient_checkpointing:  # before labeling: the student's class must support it
        from .training import check_checkpointing

        check_checkpointing(cfg)
    identity = {"schema_version": SCHEMA_VERSION,  # in this order (the manifest's bytes)
                "dataset": {"source": cfg.dataset.source, "fingerprint": fingerprint(train), "rows": train.num_rows, **dataset},
                "teachers": teacher_identities(cfg), "label_kind": label_kind,
                "k": cfg.lm.k if label_kind == "topk" else None, "shard_size": cfg.store.shard_size}
    return Prepared(train, test, identity, ensemble_record(cfg), tokenizer)


def ensemble_record(cfg: DistillConfig) -> dict:  # as the manifest records it, weights keyed by teacher
    return {**cfg.ensemble.model_dump(), "weights": {t.name: t.weight for t in cfg.teachers}}


def teacher_identities(cfg: DistillConfig) -> list[dict]:
    """Teachers by name everywhere (store columns, ensemble, evaluation): list order never changes a store."""
    for t in (teachers := sorted(cfg.teachers, key=lambda t: t.name)):  # features name layers the teachers have
        check_layers(t.model_dump())
    with ThreadPoolExecutor(len(teachers)) as pool:  # read and hashed at once: hashlib and reads release the GIL
        prints = list(pool.map(lambda t: teacher_fingerprint(t.model_dump()), teachers))
    return [{"name": t.name, "backend": t.backend, "fingerprint": fp,
             **({"features": list(t.features), "pool": t.pool} if t.features else {})}  # no key: as before features
            for t, fp in zip(teachers, prints)]


def _classification_split(cfg: DistillConfig) -> tuple[pa.Table, pa.Table, dict, str, None]:
    d = cfg.dataset
    if cfg.text_classification:  # dataset.text: token ids of the texts, in the same columns
        table, test_table = _text_tables(cfg)
    else:
        table = load_dataset(d.source, d.features, d.label, d.id_column, d.limit)
        test_table = load_dataset(d.test_source, d.features, d.label, d.id_column) if d.test_source else None
    if d.test_source:  # a separate held-out file: every row of `source` is labeled and trained on
        train, test = table, test_table
        if features_of(test).shape[1] != features_of(train).shape[1]:
            raise DistillError(f"dataset.test_source: {d.test_source} has {features_of(test).shape[1]} features, "
                               f"dataset.source has {features_of(train).shape[1]}")
    else:
        train_idx, test_idx = split_indices(table.num_rows, d.test_fraction, d.seed)
        if len(train_idx) == 0 or len(test_idx) == 0:
            raise DistillError(f"dataset.test_fraction: {d.test_fraction} leaves an empty split of {table.num_rows} rows")
        train, test = table.take(train_idx), table.take(test_idx)
    if cfg.student.arch == "hf":  # before labeling: a student that cannot read these rows fails now
        _check_cls_student(cfg, train)
    if cfg.train.extra_losses:  # before labeling too: the layers the terms read from the student
        from .extra_terms import check_before_labeling

        check_before_labeling(cfg, features_of(train).shape[1])
    return train, test, {"feature_dim": features_of(train).shape[1]}, "dense", None


def _check_cls_student(cfg: DistillConfig, train: pa.Table) -> None:
    """student.arch hf: its config loads, the features fit it as token ids, its num_labels covers the
    labels (the teachers' class count is checked once labeled)."""
    from .cls_students import FIELD, check_token_inputs, cls_student_config

    config = cls_student_config(lm_student_spec(cfg))
    check_token_inputs(config, features_of(train))
    top = int(train.column("label").to_numpy().max())
    if top >= config.num_labels:
        raise DistillError(f"{FIELD[cfg.student.init]}: the student has num_labels {config.num_labels}, the dataset has "
                           f"class id {top}; set num_labels to the teachers' class count in its config.json")


def cls_tokenizer(cfg: DistillConfig) -> str | None:
    """student.arch hf: the ensemble's tokenizer dir (dataset.text is tokenized with it, padding is
    its pad id, it is exported with the student): student.tokenizer, else the first hf teacher's
    dir with tokenizer files, else None (token-id columns without padding need none)."""
    if cfg.task == "lm" or cfg.student.arch != "hf":
        return None
    if cfg.student.tokenizer:
        return cfg.student.tokenizer
    return next((t.path for t in cfg.teachers if t.backend == "hf" and tokenizer_files(t.path)), None)


def _text_tables(cfg: DistillConfig) -> tuple[pa.Table, pa.Table | None]:
    """dataset.text: source (and test_source) tokenized with the ensemble's tokenizer, right-padded
    with its pad id to one width (the longest row, cut at the fewest positions any hf model takes),
    stored as the `features` token ids. Every hf teacher must use that tokenizer, so that it reads
    the same ids and masks the same padding (orchestrator/models.py ClassifierTeacher)."""
    from .cls_students import cls_student_config
    from .models import POSITION_KEYS

    d, tok_dir = cfg.dataset, cls_tokenizer(cfg)
    if tok_dir is None:
        raise DistillError("student.tokenizer: dataset.text needs a tokenizer to turn the texts into token ids; "
                           "set student.tokenizer, or use an hf teacher whose dir has its tokenizer files")
    ref = tokenizer_hash(tok_dir)
    if ref is None:
        raise DistillError(f"student.tokenizer: no tokenizer files in {tok_dir}")
    tokenizer = load_tokenizer(tok_dir, "student.tokenizer")
    if tokenizer.pad_token_id is None:
        raise DistillError(f"student.tokenizer: {tok_dir} defines no pad token to pad the texts with")
    for t in cfg.teachers:
        if t.backend != "hf" or tokenizer_hash(t.path) == ref:
            continue
        # Re-saved files (reformatted, another library version) are fine if the teacher reads the
        # same ids and masks the same pad id (ClassifierTeacher takes it from its own tokenizer).
        pad = load_tokenizer(t.path, f"teacher '{t.name}'").pad_token_id if tokenizer_files(t.path) else None
        if not same_vocabulary(tok_dir, t.path) or pad != tokenizer.pad_token_id:
            raise DistillError(f"teacher '{t.name}': dataset.text is tokenized with {tok_dir}, and {t.path} has "
                               "other (or no) tokenizer files; an hf teacher must share the tokenizer (and its padding)")
        log.info("prepare: the tokenizer files of %s and %s differ, but map every id to the same token and pad "
                 "with id %d; dataset.text is tokenized with %s", tok_dir, t.path, pad, tok_dir)
    check_student_tokenizer(spec := lm_student_spec(cfg), tok_dir)
    configs = [cls_student_config(spec).to_dict()]
    configs += [json.loads((Path(t.path) / "config.json").read_text()) for t in cfg.teachers if t.backend == "hf"]
    limits = [c[k] for c in configs for k in POSITION_KEYS[:1] if isinstance(c.get(k), int)]
    max_len = min([*limits, *([tokenizer.model_max_length] if tokenizer.model_max_length < 1e6 else [])] or [512])
    parts = [load_labeled_text(d.source, d.text, d.label, d.id_column, d.limit)]
    if d.test_source:
        parts.append(load_labeled_text(d.test_source, d.text, d.label, d.id_column))
    encoded = [tokenizer(texts)["input_ids"] for texts, _, _ in parts]
    x, cut = pad_tokens([t for e in encoded for t in e], tokenizer.pad_token_id, max_len)
    log.info("prepare: dataset.text tokenized with %s: %d rows of %d tokens (%d cut at %d)",
             tok_dir, len(x), x.shape[1], cut, max_len)
    tables, at = [], 0
    for (_, y, ids), e in zip(parts, encoded):
        xi, at = x[at:at + len(e)], at + len(e)
        tables.append(make_table(ids if ids is not None else content_ids(xi), xi, y))
    return tables[0], tables[1] if len(tables) > 1 else None


def _lm_split(cfg: DistillConfig) -> tuple[pa.Table, pa.Table, dict, str, str]:
    """Tokenize once with the ensemble's one tokenizer; pack into windows of lm.max_len."""
    d = cfg.dataset
    source = cfg.student_spec_source
    check_lm_limits([t.model_dump() for t in cfg.teachers], cfg.lm.k, cfg.lm.max_len, source.get("config_file"))
    tok_dir = check_vocabulary(cfg)
    tokenizer = load_tokenizer(tok_dir)
    _check_student_source(cfg, tok_dir, len(tokenizer))  # the student's own files: vocabulary, positions, before any work
    if cfg.train.extra_losses:  # before labeling: terms the LM step computes, on layers the student has
        from .lm_extra_terms import check_lm_terms

        check_lm_terms(cfg)
    if d.format != "text":
        return _instruction_split(cfg, tokenizer, tok_dir)
    texts = load_text(d.source, d.text, d.limit)
    if d.test_source:
        test_texts = load_text(d.test_source, d.text)
    else:
        tr, te = split_indices(len(texts), d.test_fraction, d.seed)
        texts, test_texts = [texts[i] for i in tr], [texts[i] for i in te]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    if eos is None:
        raise DistillError(f"lm.tokenizer: {tok_dir} defines no eos (or pad) token to separate documents")

    def windows(batch: list[str]) -> pa.Table:
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        return token_table(pack(ids, cfg.lm.max_len, eos))

    train, test = windows(texts), windows(test_texts)
    log.info("prepare: %d train / %d held-out windows of %d tokens (tokenizer %s)",
             train.num_rows, test.num_rows, cfg.lm.max_len, tok_dir)
    return train, test, {"max_len": cfg.lm.max_len, "tokenizer": tokenizer_hash(tok_dir)}, "topk", tok_dir


def _instruction_split(cfg: DistillConfig, tokenizer, tok_dir: str) -> tuple[pa.Table, pa.Table, dict, str, str]:
    """Examples split before packing (an example is wholly train or held out), then tokenized
    with their loss masks and packed (orchestrator/instruct.py)."""
    d = cfg.dataset
    cols = {"prompt": d.prompt, "response": d.response, "messages": d.messages}
    rows = load_examples(d.source, d.format, **cols, limit=d.limit)
    if d.test_source:
        test_rows = load_examples(d.test_source, d.format, **cols)
    else:
        tr, te = split_indices(len(rows), d.test_fraction, d.seed)
        if len(tr) == 0 or len(te) == 0:
            raise DistillError(f"dataset.test_fraction: {d.test_fraction} leaves an empty split of {len(rows)} examples")
        rows, test_rows = [rows[i] for i in tr], [rows[i] for i in te]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DistillError(f"lm.tokenizer: {tok_dir} defines no pad (or eos) token to pad windows with")
    tables = []
    for part, examples in (("train", rows), ("held-out", test_rows)):
        ids, pos, mask, stats = pack_examples(tokenize_examples(tokenizer, examples, d.format, tok_dir),
                                              cfg.lm.max_len, pad, cfg.lm.packing)
        log.info("prepare: %s %s: %s (lm.packing %s)", d.format, part, stats.line(cfg.lm.max_len), cfg.lm.packing)
        tables.append(example_table(ids, pos, mask))
    dataset = {"max_len": cfg.lm.max_len, "tokenizer": tokenizer_hash(tok_dir), "format": d.format,
               "packing": cfg.lm.packing}
    return tables[0], tables[1], dataset, "topk", tok_dir


def lm_student_spec(cfg: DistillConfig) -> dict:
    """task lm: the student spec orchestrator.students builds from (plain data, pickles to Ray)."""
    source = dict(cfg.student_spec_source)
    if source["init"] == "scratch":
        path = Path(source.pop("config_file"))
        field = "student.config" if cfg.student.config else "lm.student_config"
        try:
            source["config"] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DistillError(f"{field}: cannot read {path}: {e}") from None
    return source


def _check_student_source(cfg: DistillConfig, tok_dir: str, tokens: int) -> None:
    """tok_dir, tokens: the ensemble tokenizer's dir and token count."""
    from .students import check_student_vocab, lm_student_config

    spec = lm_student_spec(cfg)
    check_student_tokenizer(spec, tok_dir)  # a pretrained student's embeddings follow its own tokenizer's ids
    vocab = ensemble_vocab(cfg, tokens)
    field = ("student.config" if cfg.student.config else "lm.student_config") if spec["init"] == "scratch" else None
    if isinstance(vocab, int):
        fitted = check_student_vocab(spec, vocab, tokens, field)
        if fitted.get("vocab_size") is not None:
            log.info("prepare: the student's vocab_size %s is resized to the ensemble's %d at build (it holds the "
                     "tokenizer's %d tokens; the rest are padding rows, new ones start as the mean row)",
                     lm_student_config(spec).vocab_size, vocab, tokens)
    if cfg.train.on_policy is not None and cfg.train.on_policy.sampler == "vllm":  # vLLM can build it
        from .vllm_sampler import check_student

        check_student(lm_student_config(spec))
    if spec["init"] == "scratch":
        return  # check_lm_limits checked its positions
    path = Path(spec["path"]) / "config.json"  # the pretrained dir, or the teacher whose layers it keeps
    _check_positions(f"the student (student.init {spec['init']})", path, lm_student_config(spec).to_dict(), cfg.lm.max_len)
