"""The instruction example's pairs (jobs/train_instruct_teachers.py), without training anything:
deterministic, the held-out topics are build_corpus's and disjoint from the train ones, every
pair fits the teachers' 256 positions in both formats, and the chat form is the same pair."""
from __future__ import annotations

import numpy as np
import pytest

from jobs.train_instruct_teachers import (MAX_TOKENS, RESPONSE_WORDS, build_pairs, packed, pair_tokens,
                                          with_chat_template)
from jobs.train_lm_teachers import build_corpus, held_out_topics, train_tokenizer
from orchestrator.instruct import tokenize_examples


def _topic(row: dict) -> str:
    return row["sample_id"].rsplit(":", 1)[0]


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return with_chat_template(train_tokenizer([r["text"] for r in corpus[0]]))  # the job's tokenizer (0.5 s)


@pytest.fixture(scope="module")
def pairs(tokenizer):
    return build_pairs(tokenizer)


def test_pairs_are_deterministic(tokenizer, pairs):
    assert build_pairs(tokenizer) == pairs
    train, test = pairs
    assert len({r["sample_id"] for r in train + test}) == len(train) + len(test)


def test_held_out_topics_are_build_corpus_ones_and_disjoint_from_train(corpus, pairs):
    train, test = pairs
    train_topics, test_topics = {_topic(r) for r in train}, {_topic(r) for r in test}
    assert test_topics == held_out_topics() == {_topic(r) for r in corpus[1]}
    assert not train_topics & test_topics
    assert train_topics == {_topic(r) for r in corpus[0]}
    assert 0.05 < len(test) / (len(train) + len(test)) < 0.2  # about 10% of the words


def test_every_pair_fits_the_teachers_positions_in_both_formats(tokenizer, pairs):
    rows = pairs[0] + pairs[1]
    assert max(pair_tokens(tokenizer, r["prompt"], r["response"]) for r in rows) <= MAX_TOKENS
    chat = tokenize_examples(tokenizer, [r["messages"] for r in rows], "chat", "tok")
    plain = tokenize_examples(tokenizer, [(r["prompt"], r["response"]) for r in rows], "prompt_response", "tok")
    assert max(len(ids) for ids, _ in chat + plain) <= MAX_TOKENS
    words = [len(r["response"].split()) for r in rows]
    assert max(words) <= RESPONSE_WORDS[1]
    assert np.mean(words) > RESPONSE_WORDS[0]  # cut to fit rarely, not to nothing
    assert min(words) >= 5


def test_messages_are_the_pair(pairs):
    for r in pairs[0] + pairs[1]:
        assert r["messages"] == [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
        assert _topic(r).replace("-", " ") in r["prompt"]
        assert r["response"].split()[0] and r["prompt"] != r["response"]


def test_loss_falls_on_the_assistant_turn_only(tokenizer, pairs):
    """The job fine-tunes on the pipeline's layout: in a packed window the masked-in tokens of
    each example decode to exactly its response and the template's end of turn."""
    rows = pairs[1][:6]
    ids, pos, mask = packed(tokenizer, rows)
    assert ids.shape[1] == MAX_TOKENS
    got = []
    for w in range(len(ids)):
        starts = list(np.flatnonzero(pos[w].numpy() == 0)) + [MAX_TOKENS]
        for s, e in zip(starts[:-1], starts[1:]):
            sel = mask[w, s:e].bool()
            if sel.any():
                got.append(tokenizer.decode(ids[w, s:e][sel]))
    assert got == [r["response"] + "</s>\n" for r in rows]


def test_the_example_config_gives_train_workers_an_absolute_teacher_path(tmp_path, monkeypatch):
    """Ray Train workers run in their own working directory: the example's relative teacher path
    (student.init teacher) must reach them resolved against the driver's (it once did not)."""
    from pathlib import Path

    from orchestrator.config import load_config

    example = Path(__file__).resolve().parent.parent / "examples" / "lm_instruct.yaml"
    monkeypatch.chdir(tmp_path)
    spec = load_config(example).student_spec_source
    assert spec == {"init": "teacher", "path": str(tmp_path / "artifacts/teachers/instruct/large"), "layers": [0, 3]}
    spec = load_config(example, ["student.init=pretrained", "student.path=dirs/p", "student.teacher=null",
                                 "student.layers=null"]).student_spec_source
    assert spec["path"] == str(tmp_path / "dirs/p")
