"""generate.include_reference, the pure part: each prompt's own answer from the dataset (chat: the
whole conversation, prompt_response: the response text), and refusals that name the field."""
from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.config import config_from_dict
from orchestrator.errors import DistillError
from orchestrator.prompts import Prompt, reference_answers, reference_record


def _cfg(tmp_path, fmt: str, rows: list[dict]):
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    return config_from_dict({"task": "lm", "dataset": {"source": str(tmp_path / "d.parquet"), "format": fmt},
                             "teachers": [{"name": "t", "backend": "hf", "path": str(tmp_path)}],
                             "student": {"config": str(tmp_path / "s.json")}, "generate": {"include_reference": True}})


def test_chat_reference_is_the_whole_conversation_and_a_row_of_the_output(tmp_path):
    conv = [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a."},
            {"role": "user", "content": "more?"}, {"role": "assistant", "content": "b."}]
    cfg = _cfg(tmp_path, "chat", [{"messages": conv[:2]}, {"messages": conv}])
    prompts = [Prompt("p1", 1, [1, 2], conv[:3]), Prompt("p0", 0, [1], conv[:1])]  # in any order: by row
    refs = reference_answers(cfg, prompts)
    assert refs == {"p1": conv, "p0": conv[:2]}
    rec = reference_record(prompts[0], refs["p1"])
    assert rec["conversation"] == conv and rec["origin"] == "reference" and rec["sample_id"] == "p1/reference"


def test_prompt_response_reference_is_the_response_text(tmp_path):
    cfg = _cfg(tmp_path, "prompt_response", [{"prompt": "q?", "response": "the answer"}])
    refs = reference_answers(cfg, [Prompt("p", 0, [1], "q?")])
    assert refs == {"p": "the answer"}
    assert reference_record(Prompt("p", 0, [1], "q?"), refs["p"])["text"] == "the answer"


@pytest.mark.parametrize("fmt, rows, expect", [
    ("prompt_response", [{"prompt": "q?", "response": " "}], r"generate\.include_reference: row 0 of .* has no reference "
                                                              r"answer \(dataset\.response\)"),
    ("chat", [{"messages": [{"role": "user", "content": "q?"}]}], r"generate\.include_reference: row 0 of .* has no "
                                                                  r"reference answer \(dataset\.messages\)"),
])
def test_a_prompt_without_its_answer_is_refused(tmp_path, fmt, rows, expect):
    with pytest.raises(DistillError, match=expect) as e:
        reference_answers(_cfg(tmp_path, fmt, rows), [Prompt("p", 0, [1], "q?")])
    assert "\n" not in str(e.value) and re.search("include_reference false", str(e.value))
