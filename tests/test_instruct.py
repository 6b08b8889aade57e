"""Instruction data without Ray: loading, masks, truncation, packing, and packed forward passes."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.errors import DistillError
from orchestrator.instruct import example_table, load_examples, pack_examples, rows_of, targets, tokenize_examples
from orchestrator.packing import check_packing
from tests.helpers_lm import corpus, instruct_rows, make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"), corpus(4))


def ex(ids, mask):
    return np.array(ids, np.int64), np.array(mask, np.uint8)


def test_packing_by_hand():
    examples = [ex([1, 2, 3], [0, 1, 1]), ex([4, 5], [0, 1]), ex([6, 7, 8, 9], [0, 0, 1, 1])]
    ids, pos, mask, stats = pack_examples(examples, max_len=6, pad_id=0)
    np.testing.assert_array_equal(ids, [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]])
    np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])  # padding: its own segment
    np.testing.assert_array_equal(mask, [[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0]])
    assert (stats.windows, stats.tokens, stats.loss_tokens) == (2, 9, 5)
    # Position p carries loss when token p+1 does: never across an example's start.
    np.testing.assert_array_equal(targets(np.stack([ids, pos, mask], 1))[0], [1, 1, 0, 1, 0])
    one, *_ = pack_examples(examples, max_len=6, pad_id=0, packing=False)
    assert one.shape == (3, 6)


def test_truncation_keeps_the_start_and_drops_examples_without_a_response_token():
    examples = [ex([1, 2, 3, 4, 5], [0, 0, 0, 1, 1]), ex([1, 2, 3, 4, 5], [0, 0, 1, 1, 1])]
    ids, pos, mask, stats = pack_examples(examples, max_len=3, pad_id=0)
    assert (stats.truncated, stats.dropped, stats.windows) == (2, 1, 1)
    np.testing.assert_array_equal(ids, [[1, 2, 3]])
    np.testing.assert_array_equal(mask, [[0, 0, 1]])
    with pytest.raises(DistillError, match="lm.max_len"):
        pack_examples(examples[:1], max_len=3, pad_id=0)


def test_an_examples_first_token_never_carries_loss():
    _, _, mask, _ = pack_examples([ex([1, 2], [1, 1])], max_len=4, pad_id=0)
    np.testing.assert_array_equal(mask, [[0, 1, 0, 0]])


def test_prompt_response_mask_is_the_response_and_eos(tok):
    (ids, mask), = tokenize_examples(tok, [("About if?", "It runs a block.")], "prompt_response", "tok")
    p = tok("About if?")["input_ids"]
    r = tok("It runs a block.", add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(ids, [*p, *r, tok.eos_token_id])
    np.testing.assert_array_equal(mask, [0] * len(p) + [1] * (len(r) + 1))


def test_chat_mask_covers_the_assistant_turns_only(tok):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "About if?"},
            {"role": "assistant", "content": "It branches."}, {"role": "user", "content": "And for?"},
            {"role": "assistant", "content": "It loops."}]
    (ids, mask), = tokenize_examples(tok, [conv], "chat", "tok")
    learned = tok.decode(ids[mask == 1])
    assert learned == "It branches.</s>\nIt loops.</s>\n", learned
    assert "Be brief" in tok.decode(ids[mask == 0]) and "And for?" in tok.decode(ids[mask == 0])


def test_chat_without_a_template_or_with_an_inconsistent_one_is_refused(tok):
    conv = instruct_rows(1, 1)[0]["messages"]
    saved = tok.chat_template
    try:
        tok.chat_template = None
        with pytest.raises(DistillError, match="has none"):
            tokenize_examples(tok, [conv], "chat", "tokdir")
        tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
        with pytest.raises(DistillError, match="cannot be located"):
            tokenize_examples(tok, [conv], "chat", "tokdir")
    finally:
        tok.chat_template = saved



# Qwen3's way, reduced: an answer after the last user turn shows its (empty) reasoning block, and
# earlier answers lose it, so a prefix of the conversation renders an earlier answer otherwise.
THINKING_TEMPLATE = (
    "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}{% for m in messages %}<s>{{ m['role'] }}\n{% if m['role'] == 'assistant' and "
    "loop.index0 > ns.last %}<think></think>{% endif %}{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def test_a_template_that_rewrites_earlier_answers_keeps_the_last_one(tok, caplog):
    conv = [{"role": "user", "content": "About if?"}, {"role": "assistant", "content": "It branches."},
            {"role": "user", "content": "And for?"}, {"role": "assistant", "content": "It loops."}]
    saved = tok.chat_template
    try:
        tok.chat_template = THINKING_TEMPLATE
        with caplog.at_level("INFO", logger="distill"):
            (ids, mask), = tokenize_examples(tok, [conv], "chat", "tokdir")
        assert tok.decode(ids[mask == 1]) == "<think></think>It loops.</s>\n"
        assert "It branches." in tok.decode(ids[mask == 0])  # the earlier answer: context, no loss
        assert "1 earlier assistant turns in 1 conversations carry no loss" in caplog.text
        with pytest.raises(DistillError, match="cannot be located"):  # the last answer must be located
            tokenize_examples(tok, [conv + [{"role": "user", "content": "Thanks."}]], "chat", "tokdir")
    finally:
        tok.chat_template = saved

def test_load_examples_names_the_bad_column_or_row(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": ["x", " "]}), path)
    with pytest.raises(DistillError, match=r"dataset.response: row 1"):
        load_examples(str(path), "prompt_response")
    with pytest.raises(DistillError, match=r"dataset.prompt: column 'question' not found"):
        load_examples(str(path), "prompt_response", prompt="question")
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "hi"}]]}), path)
    with pytest.raises(DistillError, match="no assistant turn"):
        load_examples(str(path), "chat")


def test_example_table_rows_round_trip():
    ids, pos, mask, _ = pack_examples([ex([5, 6, 7], [0, 1, 1]), ex([8, 9], [0, 1])], max_len=4, pad_id=0)
    table = example_table(ids, pos, mask)
    rows = rows_of(table)
    assert rows.shape == (2, 3, 4) and table.num_rows == len(set(table.column("sample_id").to_pylist()))
    np.testing.assert_array_equal(rows[:, 0], ids)


def _llama(vocab=50):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def test_packed_teacher_rows_equal_each_example_alone(tmp_path):
    from orchestrator.models import CausalLMTeacher

    _llama().save_pretrained(tmp_path)
    teacher = CausalLMTeacher({"name": "t", "backend": "hf", "path": str(tmp_path)}, k=4)
    a, b = ex([3, 4, 5, 6], [0, 0, 1, 1]), ex([7, 8, 9, 10, 11], [0, 1, 1, 1, 1])
    ids, pos, mask, _ = pack_examples([a, b], max_len=10, pad_id=0)
    t_ids, t_lps, t_nll = teacher.score(np.stack([ids, pos, mask], 1))
    assert t_ids.shape == (2 + 4, 4)  # a: 2 response tokens, b: 4
    alone = [teacher.score(e[0][None]) for e in (a, b)]
    np.testing.assert_allclose(t_lps[:2], alone[0][1][0, 1:3], atol=1e-5)  # positions 1, 2 predict tokens 2, 3
    np.testing.assert_allclose(t_lps[2:], alone[1][1][0, 0:4], atol=1e-5)
    np.testing.assert_allclose(t_nll[2:], alone[1][2][0, 0:4], atol=1e-5)


def test_a_model_that_attends_across_examples_is_refused():
    class IgnoresPositions(torch.nn.Module):  # what packing would silently do to such a model
        def __init__(self):
            super().__init__()
            self.inner = _llama()
            self.config = self.inner.config

        def forward(self, input_ids, position_ids=None, **kwargs):
            return self.inner(input_ids=input_ids)

    check_packing(_llama(), "the student")  # transformers' Llama keeps examples apart
    with pytest.raises(DistillError, match="lm.packing: false"):
        check_packing(IgnoresPositions(), "the student")
