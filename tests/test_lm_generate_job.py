"""jobs/lm_generate.py's split of the curated file into training sets, without Ray: the mixed set
keeps every reference answer and, with --generated-fraction, the teachers' answers to a stable
subset of the prompts (all of a chosen prompt's answers, none of the others')."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.lm_generate import _chosen, _split


def _curated(path):
    rows = [{"sample_id": f"p{i}/reference", "origin": "reference", "prompt_id": f"p{i}"} for i in range(200)]
    rows += [{"sample_id": f"p{i}/{t}/0", "origin": "teacher", "prompt_id": f"p{i}"} for i in range(200) for t in ("a", "b")]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_mixed_set_takes_a_stable_fraction_of_the_prompts_answers(tmp_path):
    curated = _curated(tmp_path / "generated.parquet")
    whole = _split(curated)
    assert whole["mixed"].name == "mixed.parquet" and pq.read_table(whole["mixed"]).num_rows == 600
    generated = pq.read_table(whole["generated"]).to_pylist()
    assert len(generated) == 400 and {r["origin"] for r in generated} == {"teacher"}

    part = _split(curated, 0.3)
    assert part["mixed"].name == "mixed_f0.3.parquet"
    rows = pq.read_table(part["mixed"]).to_pylist()
    assert sum(r["origin"] == "reference" for r in rows) == 200  # every reference stays
    answered = {r["prompt_id"] for r in rows if r["origin"] == "teacher"}
    assert answered == {f"p{i}" for i in range(200) if _chosen(f"p{i}", 0.3)}
    assert all(sum(r["prompt_id"] == p and r["origin"] == "teacher" for r in rows) == 2 for p in answered)
    assert 40 <= len(answered) <= 80  # about 0.3 of 200: the hash spreads the prompts
    assert pq.read_table(_split(curated, 0.3)["mixed"]).equals(pq.read_table(part["mixed"]))  # same subset again
    assert {p for p in answered} < {f"p{i}" for i in range(200) if _chosen(f"p{i}", 0.6)}  # nested as F grows
