"""RunTracker against a real local MLflow store, with the job writing while it reads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import seed_mlflow_store
from tests.platform.conftest import add_job, memory_database
from thinkforge.contract import TRAINED_TOKENS
from thinkforge.jobs.config import SFTConfig
from thinkforge.jobs.tracking import MetricLogger, open_job_run
from thinkforge.platform.models import Job, JobEvent, new_id
from thinkforge.platform.status import JobStatus
from thinkforge.platform.tracker import STEP_METRICS, RunTracker


@pytest.fixture
def sessions() -> Iterator[sessionmaker[Session]]:
    with memory_database() as factory:
        yield factory


def job_with_a_run(
    sessions: sessionmaker[Session], tmp_path: Path, config: dict[str, Any] | None = None
) -> tuple[str, str, str]:
    """A running job and its MLflow run in a local store: (tracking uri, job id, run id)."""
    uri = f"sqlite:///{seed_mlflow_store(tmp_path / 'mlflow.db')}"
    job_id = new_id("ftjob")
    sft = SFTConfig(model="thinkforge/tiny", dataset="train.jsonl")
    run_id = open_job_run(tracking_uri=uri, job_id=job_id, config=sft, dataset_sha256="d" * 64)
    with sessions.begin() as session:
        add_job(session, job_id=job_id, status=JobStatus.RUNNING, config=config)
    return uri, job_id, run_id


def step_metrics(step: int) -> dict[str, float]:
    return {key: 10.0 - step if key == "loss" else float(step) for key in STEP_METRICS}


class WritesBetweenReads(RunTracker):
    """The job logs its next step while the tracker is half-way through reading histories."""

    def __init__(self, logger: MetricLogger, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.logger = logger
        self.next_step = 1
        self.writing = True

    def client(self) -> Any:
        real = super().client()
        tracker = self

        class Interleaving:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def get_metric_history(self, run_id: str, key: str) -> Any:
                points = real.get_metric_history(run_id, key)
                if tracker.writing and key == STEP_METRICS[0]:  # after the first metric
                    tracker.logger.log(step_metrics(tracker.next_step), step=tracker.next_step)
                    tracker.logger.flush()
                    tracker.next_step += 1
                return points

        return Interleaving()


def test_only_complete_steps_are_recorded_while_the_job_writes(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    uri, job_id, run_id = job_with_a_run(sessions, tmp_path)
    tracker = WritesBetweenReads(
        MetricLogger(uri, run_id), tracking_uri=uri, storage_path=str(tmp_path / "ckpt")
    )

    def recorded() -> dict[int, dict[str, Any]]:
        with sessions() as session:
            rows = session.scalars(select(JobEvent).where(JobEvent.type == "metrics"))
            return {row.data["step"]: row.data for row in rows}

    for _ in range(4):  # steps 1-4 are logged, each in the middle of a pass
        with sessions.begin() as session:
            tracker.sync(session, _job(session, job_id), final=False)
    seen = recorded()
    # The last pass read loss up to step 3; step 3 may still be half-written, step 4 is
    # newer than what was read first: both wait for a later pass.
    assert sorted(seen) == [1, 2]
    for step, data in seen.items():
        assert data == {"step": step, **step_metrics(step)}

    tracker.writing = False
    with sessions.begin() as session:  # the job has ended: the last step is written too
        tracker.sync(session, _job(session, job_id), final=True)
    seen = recorded()
    assert sorted(seen) == [1, 2, 3, 4]
    assert all(set(data) == {"step", *STEP_METRICS} for data in seen.values())


def _job(session: Session, job_id: str) -> Job:
    return session.scalars(select(Job).where(Job.id == job_id)).one()


def test_what_tokenization_did_to_the_dataset_is_one_event(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    uri, job_id, run_id = job_with_a_run(sessions, tmp_path, config={"block_size": 128})
    stats = {"records": 10, "kept": 8, "overlong": 3, "truncated": 1, "dropped": 2}
    logger = MetricLogger(uri, run_id)
    logger.log({f"data_{k}": v for k, v in {**stats, "sequences": 8}.items()}, step=0)
    logger.flush()
    tracker = RunTracker(tracking_uri=uri, storage_path=str(tmp_path / "ckpt"))
    for _ in range(2):  # any number of passes: one event
        with sessions.begin() as session:
            tracker.sync(session, _job(session, job_id), final=False)
    with sessions() as session:
        (event,) = session.scalars(select(JobEvent).where(JobEvent.dedupe_key == "data"))
    assert event.level == "warning" and event.data == {**stats, "sequences": 8, "block_size": 128}
    assert "3 longer than block_size 128 (1 truncated, 2 dropped)" in event.message


def test_trained_tokens_come_from_the_metric_training_logs(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Training logs the running count at every step under the contract's name; the job
    object shows the last one once the job has ended."""
    uri, job_id, run_id = job_with_a_run(sessions, tmp_path)
    logger = MetricLogger(uri, run_id)
    for step, count in enumerate((640, 1280, 1900), start=1):
        logger.log({**step_metrics(step), TRAINED_TOKENS: count}, step=step)
    logger.flush()
    tracker = RunTracker(tracking_uri=uri, storage_path=str(tmp_path / "ckpt"))
    with sessions.begin() as session:
        tracker.sync(session, _job(session, job_id), final=False)
    with sessions() as session:
        assert _job(session, job_id).trained_tokens is None  # still running
    with sessions.begin() as session:
        tracker.sync(session, _job(session, job_id), final=True)
    with sessions() as session:
        assert _job(session, job_id).trained_tokens == 1900
