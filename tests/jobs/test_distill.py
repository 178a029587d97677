"""Distillation without Ray: the pool's validation, asking a (fake, real-HTTP) teacher with
retries, verification, every curation stage with its counts, the s1K-1.1 output, and a
teacher that fails mid-run leaving its partial traces and an event."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.jobs.fake_teacher import FakeTeacher
from tests.platform.data import parquet
from thinkforge.contract import RESULTS_FILE
from thinkforge.jobs.config import (
    Curation,
    DatasetFormat,
    DistillConfig,
    RecordError,
    TeacherTarget,
    parse_record,
    question_of,
)
from thinkforge.jobs.distill import (
    CURATED_FILE,
    EVENTS_FILE,
    TRACES_FILE,
    EventLog,
    PoolQuestion,
    Teacher,
    TeacherFailed,
    Trace,
    curate,
    load_pool,
    run_distill,
)


def sequential(
    pool: list[PoolQuestion], samples: int, target: TeacherTarget, config: DistillConfig,
    *, sampling: dict[str, Any],
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The batch engine without Ray: one Teacher, one request after another."""
    teacher = Teacher(
        target.model_dump(), sampling, timeout_s=10, max_retries=config.max_retries,
        backoff_s=config.retry_backoff_s,
    )  # fmt: skip
    for q in pool:
        for s in range(samples):
            yield teacher.ask(q.question, q.reference, q.index, s).model_dump()


def write_pool(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_question_rows_need_a_reference_answer() -> None:
    assert question_of({"question": "Sum: 1 2", "answer": 3}) == ("Sum: 1 2", "3")
    assert question_of({"problem": "Sum: 1", "solution": "it is 1"}) == ("Sum: 1", "it is 1")
    with pytest.raises(RecordError) as exc:
        question_of({"question": "Sum: 1 2", "answer": " "})
    assert exc.value.field == "answer" and "reference answer" in str(exc.value)
    with pytest.raises(RecordError) as exc:
        question_of({"answer": "3"})
    assert exc.value.field == "question"


def test_pool_from_parquet_names_the_bad_row(tmp_path: Path) -> None:
    good = tmp_path / "q.parquet"
    good.write_bytes(parquet({"question": "Sum: 1 2", "answer": "3", "topic": "a"}))
    (q,) = load_pool(good, "topic")
    assert (q.question, q.reference, q.category) == ("Sum: 1 2", "3", "a")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(parquet({"question": "Sum: 1", "answer": "1"}, {"question": "Sum: 2"}))
    with pytest.raises(ValueError, match="row 2: no reference answer"):
        load_pool(bad)


def trace(index: int, sample: int = 0, *, thinking: str = "t", attempt: str = "Answer: 1",
          correct: bool = True, tokens: int = 10, forced_end: bool = False) -> Trace:  # fmt: skip
    return Trace(index=index, sample=sample, thinking=thinking, attempt=attempt,
                 correct=correct, thinking_tokens=tokens, forced_end=forced_end)  # fmt: skip


def pool_of(*questions: str, categories: str = "") -> list[PoolQuestion]:
    cats = categories or "x" * len(questions)
    return [
        PoolQuestion(index=i, question=q, reference="1", category=cats[i])
        for i, q in enumerate(questions)
    ]


def test_curation_counts_every_stage() -> None:
    pool = pool_of("q0", "q1", "Q0 ", "q3", "q4", "q5", "q6", "q7")
    traces = [
        trace(0, 0, tokens=5),
        trace(0, 1, tokens=50, correct=False),  # kept: the right one
        trace(1, thinking=""),  # malformed
        trace(2),  # duplicate of q0 (case and spaces aside)
        trace(3, forced_end=True),  # the budget ended its thinking
        trace(4, correct=False),
        trace(4, 1, correct=False),  # never right
        trace(5, tokens=30),
        trace(6, tokens=20),
        trace(7, tokens=40),
    ]
    rows, stages, per_q = curate(pool, traces, Curation(min_correct=1), seed=0)
    assert stages["pool"] == 8 and stages["traces"] == 10
    assert stages["verified"] == {"correct_traces": 7, "questions_with_a_correct_sample": 7}
    assert stages["quality"] == {"malformed": 1, "missing_end_of_thinking": 1,
                                 "duplicate_questions": 1, "questions_kept": 5}  # fmt: skip
    assert stages["correctness"]["dropped"] == 1 and stages["correctness"]["questions_kept"] == 4
    assert stages["final"] == 4
    # Ranked by thinking length, longest first; q0's kept trace is its right one (5 tokens).
    assert [r["metadata"]["index"] for r in rows] == [7, 5, 6, 0]
    assert rows[-1]["metadata"]["sample"] == 0 and rows[-1]["metadata"]["thinking_tokens"] == 5
    dropped = {r["index"]: r["dropped_at"] for r in per_q}
    assert dropped == {0: None, 1: "quality", 2: "quality", 3: "quality", 4: "correctness",
                       5: None, 6: None, 7: None}  # fmt: skip
    assert per_q[0]["samples"] == 2 and per_q[0]["correct"] == 1
    assert per_q[0]["thinking_tokens"] == [5, 50]
    for row in rows:  # s1K-1.1 rows: what training reads
        example = parse_record(row, DatasetFormat.AUTO)
        assert example.thinking == "t" and example.answer == "Answer: 1"
        assert parse_record(row).prompt[0].content == row["question"]


def test_min_correct_zero_keeps_unverified_traces_and_forced_ends_can_stay() -> None:
    pool = pool_of("q0", "q1")
    traces = [trace(0, correct=False, forced_end=True), trace(1, correct=False)]
    rows, stages, _ = curate(pool, traces, Curation(min_correct=0, drop_forced_end=False), seed=0)
    assert len(rows) == 2 and stages["verified"]["correct_traces"] == 0
    assert stages["quality"]["missing_end_of_thinking"] == 0


def test_difficulty_drops_what_the_weaker_model_solves() -> None:
    pool = pool_of("q0", "q1", "q2")
    traces = [trace(0, tokens=1), trace(1, tokens=2), trace(2, tokens=3)]
    rows, stages, per_q = curate(
        pool, traces, Curation(weaker=TeacherTarget(base_url="http://w/v1", model="w")), seed=0,
        weaker_correct={0: True, 1: False, 2: True},
    )  # fmt: skip
    assert [r["metadata"]["index"] for r in rows] == [1]
    assert stages["difficulty"]["solved_by_weaker"] == 2
    assert stages["difficulty"]["weaker_model"] == "w"
    assert [r["dropped_at"] for r in per_q] == ["difficulty", None, "difficulty"]


def test_diversity_takes_each_category_in_turn_up_to_the_limit() -> None:
    pool = pool_of("a0", "a1", "a2", "a3", "b0", "c0", categories="aaaabc")
    traces = [trace(i, tokens=10 + i) for i in range(6)]
    curation = Curation(category_field="topic", max_examples=4)
    rows, stages, _ = curate(pool, traces, curation, seed=3)
    cats = [r["metadata"]["category"] for r in rows]
    assert sorted(cats) == ["a", "a", "b", "c"]  # not the four longest (all "a")
    assert stages["diversity"]["categories"] == 3 and stages["diversity"]["dropped"] == 2
    # Within a category, the longest thinking first.
    assert [r["metadata"]["index"] for r in rows if r["metadata"]["category"] == "a"] == [3, 2]
    again, _, _ = curate(pool, traces, curation, seed=3)
    assert again == rows  # the seed decides


def test_teacher_retries_then_answers_and_verifies(tmp_path: Path) -> None:
    with FakeTeacher(flaky=2) as fake:
        target = {"base_url": fake.base_url, "model": "teacher", "api_key_env": "FAKE_KEY"}
        sampling = {"temperature": 0.5, "max_completion_tokens": 64, "seed": 7,
                    "thinking": {"max_tokens": 32}}  # fmt: skip
        import os

        os.environ["FAKE_KEY"] = "sk-fake"
        try:
            teacher = Teacher(target, sampling, timeout_s=10, max_retries=2, backoff_s=0)
            right = teacher.ask("Sum: 1 2 3", "6", 0, 1)
            wrong = teacher.ask("Sum: 1 2 [wrong]", "3", 1, 0)
        finally:
            del os.environ["FAKE_KEY"]
    assert right.error == "" and right.tries == 3 and right.correct and right.prediction == "6"
    assert right.thinking.splitlines() == ["add 1: 1", "add 2: 3", "add 3: 6"]
    assert right.thinking_tokens == 9 and not right.forced_end
    assert not wrong.correct and wrong.prediction == "4"
    first = fake.requests[0]
    assert first["seed"] == 8  # the sample's own seed: the base seed plus its number
    assert first["thinking"] == {"max_tokens": 32} and first["model"] == "teacher"
    assert set(fake.auth) == {"Bearer sk-fake"}


def test_teacher_past_its_retries_gives_an_error_trace() -> None:
    with FakeTeacher(flaky=5) as fake:
        target = {"base_url": fake.base_url, "model": "teacher"}
        teacher = Teacher(target, {}, timeout_s=10, max_retries=1, backoff_s=0)
        failed = teacher.ask("Sum: 1", "1", 0, 0)
    assert failed.tries == 2 and "503" in failed.error


def config_for(fake: FakeTeacher, dataset: Path, **curation: Any) -> DistillConfig:
    return DistillConfig(
        dataset=str(dataset), teacher=TeacherTarget(base_url=fake.base_url, model="teacher"),
        samples=2, max_retries=1, retry_backoff_s=0, curation=Curation(**curation),
    )  # fmt: skip


def test_run_distill_writes_curated_s1k_file_results_and_events(tmp_path: Path) -> None:
    pool = write_pool(tmp_path / "q.jsonl", [
        {"question": "Sum: 1 2 3 4", "answer": "10"},
        {"question": "Sum: 5 [wrong]", "answer": "5"},
        {"question": "Sum: 2 2", "solution": "2+2 is \\boxed{4}"},
        {"question": "Sum: 7 [malformed]", "answer": "7"},
        {"question": "sum: 2  2", "answer": "4"},
    ])  # fmt: skip
    out = tmp_path / "out"
    events = EventLog(out / EVENTS_FILE, "distill-1")
    with FakeTeacher() as fake:
        results = run_distill(config_for(fake, pool), out, events, generate=sequential)
    assert results["counts"] == {"questions": 5, "traces": 10, "correct_traces": 8, "kept": 2}
    stages = results["stages"]
    assert stages["quality"]["malformed"] == 2 and stages["quality"]["duplicate_questions"] == 1
    assert stages["correctness"]["dropped"] == 1
    rows = [json.loads(x) for x in (out / CURATED_FILE).read_text().splitlines()]
    assert [r["question"] for r in rows] == ["Sum: 1 2 3 4", "Sum: 2 2"]  # longest first
    assert rows[0]["attempt"] == "Answer: 10" and len(rows[0]["thinking_trajectories"]) == 1
    assert json.loads((out / RESULTS_FILE).read_text())["counts"]["kept"] == 2
    assert len((out / TRACES_FILE).read_text().splitlines()) == 10
    logged = [json.loads(x) for x in (out / EVENTS_FILE).read_text().splitlines()]
    assert [e["n"] for e in logged] == list(range(1, len(logged) + 1))
    types = [e["type"] for e in logged]
    assert types[0] == "started" and types[-1] == "finished" and "verified" in types
    assert [e["data"]["stage"] for e in logged if e["type"] == "stage"] == [
        "quality", "correctness", "difficulty", "diversity"]  # fmt: skip
    progress = [e["data"] for e in logged if e["type"] == "progress"]
    assert progress[-1]["done"] == 10 and progress[-1]["traces_per_s"] > 0


def test_weaker_model_is_asked_and_its_solved_questions_dropped(tmp_path: Path) -> None:
    pool = write_pool(tmp_path / "q.jsonl", [
        {"question": "Sum: 1 2", "answer": "3"}, {"question": "Sum: 4 4", "answer": "8"}])  # fmt: skip
    with FakeTeacher() as fake, FakeTeacher() as weak:
        weaker = TeacherTarget(base_url=weak.base_url, model="weak")
        # The weaker fake answers every question right: the teacher's are all "easy".
        results = run_distill(
            config_for(fake, pool, weaker=weaker), tmp_path / "out",
            EventLog(tmp_path / "out" / EVENTS_FILE, "d"), generate=sequential,
        )  # fmt: skip
    assert len(weak.requests) == 2 and weak.requests[0]["temperature"] == 0.0
    assert results["stages"]["difficulty"]["solved_by_weaker"] == 2
    assert results["counts"]["kept"] == 0


def test_teacher_failing_mid_run_keeps_partial_traces_and_says_how_many(tmp_path: Path) -> None:
    pool = write_pool(tmp_path / "q.jsonl",
                      [{"question": f"Sum: {i} 1", "answer": str(i + 1)} for i in range(4)])  # fmt: skip
    out = tmp_path / "out"
    with FakeTeacher(fail_after=3) as fake, pytest.raises(TeacherFailed) as exc:
        run_distill(config_for(fake, pool), out, EventLog(out / EVENTS_FILE, "d"),
                    generate=sequential)  # fmt: skip
    assert (exc.value.done, exc.value.total) == (3, 8)
    assert len((out / TRACES_FILE).read_text().splitlines()) == 3
    assert not (out / CURATED_FILE).exists()
    last = json.loads((out / EVENTS_FILE).read_text().splitlines()[-1])
    assert last["type"] == "teacher_failed" and last["level"] == "error"
    assert last["data"]["done"] == 3 and "3 of 8" in last["message"]
    # One request per try: the failing one was retried once (max_retries=1).
    assert len(fake.requests) == 3 + 2
