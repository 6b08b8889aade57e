"""The ensemble's vocabulary when checkpoints pad theirs differently, and a pretrained student's
tokenizer checked against it. Pure torch: no Ray.

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


def check_student_tokenizer(spec: dict, tok_dir: str | Path, field: str = "student.path") -> None:
    """spec: the student's (orchestrator.prepare.lm_student_spec). A pretrained student's embeddings
    are indexed by its own tokenizer's ids; it trains on the ensemble tokenizer's. If the two maps disagree (Llama-3 teachers, a Qwen student: both
    V >= 128k, so no size check notices), every row would be trained as another token's and the
    pretraining is lost: refused in one line. Ids only the ensemble has are new rows (fine); a few
    differing special tokens (a fine-tune renaming a reserved token) are logged, not refused."""
    from .errors import DistillError
    from .models import load_tokenizer, tokenizer_files, tokenizer_hash

    student_dir = spec.get("path")
    if spec["init"] == "scratch" or Path(student_dir).resolve() == Path(tok_dir).resolve() \
            or not tokenizer_files(student_dir):
        return  # no tokenizer beside the weights: nothing to compare with (its config's vocab_size is checked)
    if tokenizer_hash(student_dir) == tokenizer_hash(tok_dir):
        return
    ours = {i: t for t, i in load_tokenizer(student_dir, field).get_vocab().items()}
    theirs = {i: t for t, i in load_tokenizer(tok_dir).get_vocab().items()}
    if ours == theirs:  # files that differ in bytes only (re-saved, another pad token)
        return
    shared = ours.keys() & theirs.keys()
    differ = sorted(i for i in shared if ours[i] != theirs[i])
    if len(differ) > max(16, len(shared) // 100):
        i = differ[len(differ) // 2]
        raise DistillError(f"{field}: {student_dir} has another tokenizer than the ensemble's ({tok_dir}): "
                           f"{len(differ):,} of {len(shared):,} shared ids are other tokens (id {i}: {ours[i]!r} "
                           f"vs {theirs[i]!r}), so its pretrained embeddings would learn other tokens' ids; use a "
                           "student of the teachers' tokenizer family, student.init teacher, or a student from "
                           "scratch (distilling across tokenizers is not supported)")
    log.info("prepare: %s's tokenizer differs from the ensemble's (%s) in %d ids (%s); it has %d of the "
             "ensemble's %d ids (any others become new rows) and trains on the ensemble's",
             student_dir, tok_dir, len(differ),
             ", ".join(f"{i}: {ours[i]!r} vs {theirs[i]!r}" for i in differ[:3]) or "none", len(shared), len(theirs))
