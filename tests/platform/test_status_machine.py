"""The job status machine: written-down transitions, and random event sequences (hypothesis)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.platform.conftest import add_job, memory_database
from tests.platform.fakes import FakeLauncher
from thinkforge.platform.jobs import cancel_job, set_status
from thinkforge.platform.launcher import LaunchState
from thinkforge.platform.models import Job, JobEvent, utcnow
from thinkforge.platform.reconciler import reconcile_once
from thinkforge.platform.status import TRANSITIONS, JobStatus

TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}


def test_transitions_are_written_down_for_every_status() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    for status in JobStatus:
        assert status.is_terminal() == (status in TERMINAL)
        if status.is_terminal():
            assert not TRANSITIONS[status]
        else:
            assert JobStatus.FAILED in TRANSITIONS[status]
    assert not JobStatus.RUNNING.can_become(JobStatus.QUEUED)
    assert not JobStatus.SUCCEEDED.can_become(JobStatus.RUNNING)


@pytest.fixture(scope="module")
def sessions() -> Iterator[sessionmaker[Session]]:
    with memory_database() as factory:
        yield factory


@settings(max_examples=150, deadline=None)
@given(targets=st.lists(st.sampled_from(list(JobStatus)), max_size=12))
def test_random_status_changes_never_leave_a_terminal_state(
    sessions: sessionmaker[Session], targets: list[JobStatus]
) -> None:
    with sessions.begin() as session:
        job = add_job(session)
        history = [JobStatus(job.status)]
        for target in targets:
            before = JobStatus(job.status)
            moved = set_status(session, job, target, message=f"to {target}")
            assert moved == (before != target and before.can_become(target))
            history.append(JobStatus(job.status))
            assert (job.finished_at is not None) == JobStatus(job.status).is_terminal()
        for i, status in enumerate(history):
            if status.is_terminal():
                assert set(history[i:]) == {status}
        changes = sum(1 for a, b in itertools.pairwise(history) if a != b)
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job.id)).all()
        assert len(events) == changes


EVENTS = st.one_of(
    st.sampled_from(list(LaunchState)).map(lambda s: ("launcher", s)),
    st.just(("cancel", None)),
    st.just(("reconcile", None)),
)


@settings(max_examples=100, deadline=None)
@given(events=st.lists(EVENTS, max_size=15))
def test_random_cluster_events_and_cancels_through_the_reconciler(
    sessions: sessionmaker[Session], events: list[tuple[str, LaunchState | None]]
) -> None:
    launcher = FakeLauncher()
    with sessions.begin() as session:
        job = add_job(session)
        job.status = JobStatus.QUEUED.value
        job.submitted_at = utcnow()
        job_id = job.id
    launcher.set(job_id, LaunchState.PENDING)
    seen_terminal: JobStatus | None = None
    for kind, state in events:
        if kind == "launcher" and state is not None:
            launcher.set(job_id, state)
        elif kind == "cancel":
            with sessions.begin() as session:
                try:
                    cancel_job(session, project_id="default", job_id=job_id)
                except Exception as exc:
                    assert seen_terminal is not None, exc
        else:
            reconcile_once(sessions, launcher)
        with sessions() as session:
            row = session.scalar(select(Job).where(Job.id == job_id))
            assert row is not None
            status = JobStatus(row.status)
        if seen_terminal is not None:
            assert status == seen_terminal
        elif status.is_terminal():
            seen_terminal = status
        assert (row.finished_at is not None) == status.is_terminal()
