"""The synthetic running-sum tasks: s1K-format records whose attempts are correct, and
issue 17's variant whose one-line first pass may slip and whose "Wait" rechecks each redo
the last one-shot line, half of it one term a step."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from thinkforge.jobs.config import DatasetFormat, iter_jsonl, parse_record
from thinkforge.jobs.synthetic import (
    extract_answer,
    generate,
    make_recheck_record,
    make_record,
    recheck_split,
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


def test_each_recheck_halves_what_is_summed_at_once_then_confirms() -> None:
    assert make_recheck_record([3, 5, 2, 7]) == {
        "question": "Sum: 3 5 2 7",
        "thinking_trajectories": ["3+5+2+7=17"],
        "attempt": "17",
    }
    six = [3, 5, 2, 7, 4, 9]
    one = make_recheck_record(six, rechecks=1)["thinking_trajectories"][0]
    assert one == "3+5+2+7+4+9=30\nWait\n3+5=8\n8+2=10\n10+7=17\n17+4+9=30"
    two = make_recheck_record(six, rechecks=2)["thinking_trajectories"][0]
    assert two == f"{one}\nWait\n17+4=21\n21+9=30"  # the shorter line, one term a step
    three = make_recheck_record(six, rechecks=3)["thinking_trajectories"][0]
    assert three == f"{two}\nWait\nSo the total is 30"  # nothing left to redo
    # the steps of all rechecks are the plain trace's running sums
    steps = [s for s in two.split("\n")[1:] if s != "Wait" and s.count("+") == 1]
    assert "\n".join(steps) == make_record(six)["thinking_trajectories"][0]
    # up to four terms one recheck finishes the sum; five and six need two
    four = make_recheck_record([3, 5, 2, 7], rechecks=2)["thinking_trajectories"][0]
    assert four == "3+5+2+7=17\nWait\n3+5=8\n8+2=10\n10+7=17\nWait\nSo the total is 17"
    five = make_recheck_record([3, 5, 2, 7, 4], rechecks=2)["thinking_trajectories"][0]
    assert five.split("\nWait\n")[1:] == ["3+5=8\n8+2=10\n10+7+4=21", "10+7=17\n17+4=21"]
    assert make_recheck_record([3, 5], rechecks=1)["thinking_trajectories"] == [
        "3+5=8\nWait\n3+5=8"
    ]


def test_a_slipped_pass_is_corrected_by_the_next_recheck() -> None:
    rec = make_recheck_record([3, 5, 2, 7, 4], rechecks=2, slips=(-1, 2))
    first, recheck, last = rec["thinking_trajectories"][0].split("\nWait\n")
    assert first == "3+5+2+7+4=20"
    assert recheck == "3+5=8\n8+2=10\n10+7+4=23"  # its one-shot remainder slipped too
    assert last == "10+7=17\n17+4=21" and rec["attempt"] == "21"
    # never a negative total: the slip flips sign instead
    low = make_recheck_record([0, 0, 1], rechecks=1, slips=(-10,))
    assert low["thinking_trajectories"][0].startswith("0+0+1=11\n")
    with pytest.raises(ValueError, match="later recheck"):
        make_recheck_record([3, 5, 2], slips=(1,))
    with pytest.raises(ValueError, match="later recheck"):
        make_recheck_record([3, 5, 2, 7, 4], rechecks=1, slips=(0, 1))
    with pytest.raises(ValueError, match="one-shot line"):  # four terms: nothing left over
        make_recheck_record([3, 5, 2, 7], rechecks=2, slips=(0, 1))
    with pytest.raises(ValueError, match="one-shot line"):  # the sum is done: a confirmation
        make_recheck_record([3, 5, 2, 7, 4], rechecks=3, slips=(0, 0, 1))


def test_recheck_split_mixes_waits_and_holds_questions_out() -> None:
    train, test = recheck_split(n_train=2000, n_test=200, seed=0, slip_rate=0.4)
    assert (len(train), len(test)) == (2000, 200)
    assert not {r["question"] for r in test} & {r["question"] for r in train}
    assert recheck_split(n_train=2000, n_test=200, seed=0, slip_rate=0.4) == (train, test)
    plain = [r for r in train if "+" not in _passes(r)[0].split("=")[0][2:]]
    assert 500 < len(plain) < 700  # plain_rate 0.3: the running sums alone
    for rec in plain:
        assert rec == make_record(_terms(rec))
    oneshot = [r for r in train if r not in plain]
    waits = Counter(r["thinking_trajectories"][0].count("\nWait\n") for r in oneshot)
    assert set(waits) == {0, 1, 2, 3}
    # after each pass, ending is about as frequent as another recheck or more: unforced,
    # the model often stops after its first pass; forced, after the pass the waits asked for
    for k in range(3):
        assert waits[k] > 0.8 * sum(n for j, n in waits.items() if j > k)
    assert waits[2] > 160 and waits[3] > 80  # a second and third wait: in distribution
    slipped = remainder_slips = 0
    for rec in oneshot:
        example = parse_record(rec, DatasetFormat.AUTO)
        passes = example.thinking.split("\nWait\n")
        assert passes[-1].endswith(f"{rec['attempt']}") and _right(passes[-1])  # it is right
        wrong = not passes[0].endswith(f"={rec['attempt']}")
        assert not wrong or len(passes) > 1  # only a rechecked first pass slips
        slipped += wrong
        remainder_slips += sum(not _right(p) for p in passes[1:-1])
    rechecked = waits[1] + waits[2] + waits[3]
    assert 0.3 * rechecked < slipped < 0.5 * rechecked  # slip_rate 0.4
    assert remainder_slips > 30  # a recheck's one-shot remainder slips when another follows
    for rec in test:  # drawn like the training questions, graded on the attempt only
        terms = _terms(rec)
        assert 3 <= len(terms) <= 6 and rec["attempt"] == str(sum(terms))
        assert rec["thinking_trajectories"] == ["+".join(map(str, terms)) + f"={sum(terms)}"]
    unslipped, _ = recheck_split(n_train=500, n_test=50, seed=0, slip_rate=0)
    assert all(p.endswith(r["attempt"]) for r in unslipped for p in _passes(r))
    with pytest.raises(ValueError, match="plain_rate"):
        recheck_split(10, 5, plain_rate=1)


def _terms(rec: dict[str, str | list[str]]) -> list[int]:
    return [int(t) for t in str(rec["question"]).removeprefix("Sum: ").split()]


def _passes(rec: dict[str, str | list[str]]) -> list[str]:
    return str(rec["thinking_trajectories"][0]).split("\nWait\n")


def _right(recheck: str) -> bool:
    """Whether every line of a recheck adds up (steps and one-shot remainders alike)."""
    for line in recheck.split("\n"):
        if line.startswith("So the total is"):
            continue
        terms, total = line.split("=")
        if sum(int(t) for t in terms.split("+")) != int(total):
            return False
    return True
