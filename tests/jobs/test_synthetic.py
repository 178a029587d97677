"""The synthetic running-sum task: s1K-format records whose traces are correct."""

from __future__ import annotations

import json
from pathlib import Path

from thinkforge.jobs.config import DatasetFormat, iter_jsonl, parse_record
from thinkforge.jobs.synthetic import (
    extract_answer,
    generate,
    make_record,
    train_test_split,
    write_jsonl,
)


def test_make_record_writes_running_sums() -> None:
    assert make_record([3, 5, 2, 7]) == {
        "question": "Sum: 3 5 2 7",
        "thinking_trajectories": ["3+5=8\n8+2=10\n10+7=17"],
        "attempt": "17",
    }


def test_records_parse_as_s1k_and_are_correct() -> None:
    for rec in generate(200, seed=3, min_terms=2, max_terms=6):
        example = parse_record(rec, DatasetFormat.AUTO)
        terms = [int(t) for t in rec["question"].removeprefix("Sum: ").split()]
        assert 2 <= len(terms) <= 6
        assert example.answer == str(sum(terms))
        assert example.thinking.count("\n") == len(terms) - 2
        assert example.thinking.endswith(f"={sum(terms)}")


def test_generation_is_seeded() -> None:
    assert generate(50, seed=1) == generate(50, seed=1)
    assert generate(50, seed=1) != generate(50, seed=2)


def test_held_out_split_is_disjoint() -> None:
    train, test = train_test_split(n_train=500, n_test=200, seed=0)
    assert (len(train), len(test)) == (500, 200)
    test_questions = {r["question"] for r in test}
    assert len(test_questions) == 200
    assert not test_questions & {r["question"] for r in train}
    assert train_test_split(n_train=500, n_test=200, seed=0) == (train, test)


def test_write_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d" / "sums.jsonl", n=20, seed=0)
    lines = path.read_text().splitlines()
    assert len(lines) == 20 and json.loads(lines[0]) == generate(1, seed=0)[0]
    assert len(list(iter_jsonl(path))) == 20


def test_extract_answer() -> None:
    assert extract_answer("Answer: 17") == "17"
    assert extract_answer("3+5=8\n8+9=17\nAnswer: 17<|im_end|>") == "17"
    assert extract_answer("no number") is None


def test_recheck_traces_repeat_the_sums_after_a_wait() -> None:
    assert make_record([3, 5], recheck=True)["thinking_trajectories"] == ["3+5=8\nWait\n3+5=8"]
    plain, _ = train_test_split(n_train=400, n_test=50, seed=0)
    checked, _ = train_test_split(n_train=400, n_test=50, seed=0, recheck_rate=0.25)
    assert [r["question"] for r in checked] == [r["question"] for r in plain]
    waits = sum("\nWait\n" in r["thinking_trajectories"][0] for r in checked)
    assert 50 < waits < 150
    assert all(r["attempt"] == p["attempt"] for r, p in zip(checked, plain, strict=True))
