"""The job status machine: written-down transitions, and random event sequences (hypothesis)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.platform.conftest import add_job, memory_database
from tests.platform.fakes import FakeLauncher
from thinkforge.jobs.evaluate import RESULTS_FILE
from thinkforge.platform import evals
from thinkforge.platform.deployments import app_name, sync_statuses
from thinkforge.platform.deployments import set_status as set_deployment_status
from thinkforge.platform.errors import Conflict
from thinkforge.platform.evals import set_status as set_eval_status
from thinkforge.platform.jobs import cancel_job, set_status
from thinkforge.platform.launcher import LaunchState
from thinkforge.platform.models import Deployment, Evaluation, Job, JobEvent, new_id, utcnow
from thinkforge.platform.reconciler import reconcile_once
from thinkforge.platform.serving import AppStatus
from thinkforge.platform.settings import Settings
from thinkforge.platform.status import (
    DEPLOYMENT_TRANSITIONS,
    EVAL_TRANSITIONS,
    TRANSITIONS,
    DeploymentStatus,
    EvalStatus,
    JobStatus,
)

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


def test_pause_and_resume_transitions(sessions: sessionmaker[Session]) -> None:
    """Only a running job pauses, only a paused one resumes (to queued: submitted again,
    once per resume), and every pass through a status is one event."""
    assert {s for s in JobStatus if s.can_become(JobStatus.PAUSING)} == {JobStatus.RUNNING}
    assert {s for s in JobStatus if s.can_become(JobStatus.PAUSED)} == {JobStatus.PAUSING}
    assert TRANSITIONS[JobStatus.PAUSED] == {
        JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED
    }  # fmt: skip
    assert not JobStatus.PAUSED.is_terminal() and not JobStatus.PAUSING.is_terminal()
    assert not JobStatus.PAUSING.can_become(JobStatus.RUNNING)
    with sessions.begin() as session:
        job = add_job(session, status=JobStatus.RUNNING)
        job.submitted_at = utcnow()
        for _ in range(2):
            for target in (JobStatus.PAUSING, JobStatus.PAUSED, JobStatus.QUEUED):
                assert set_status(session, job, target, message=str(target))
            assert job.submitted_at is None  # the launch claims it again
            job.submitted_at = utcnow()
            assert set_status(session, job, JobStatus.RUNNING, message="running")
        assert job.resumes == 2
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job.id)).all()
        assert len(events) == 8


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


# Evaluations and deployments: the same shape (enum, transitions, one set_status).

EVAL_VALUES = ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
DEPLOYMENT_VALUES = [
    "pending",
    "updating",
    "deploying",
    "running",
    "degraded",
    "failed",
    "deleting",
]


def test_eval_and_deployment_transitions_are_written_down() -> None:
    # The stored and API values: changing one needs a migration and an API note.
    assert [s.value for s in EvalStatus] == EVAL_VALUES
    assert [s.value for s in DeploymentStatus] == DEPLOYMENT_VALUES
    assert set(EVAL_TRANSITIONS) == set(EvalStatus)
    for status in EvalStatus:
        assert status.is_terminal() == (status.value in TERMINAL)
        assert (
            not EVAL_TRANSITIONS[status]
            if status.is_terminal()
            else status.can_become(EvalStatus.FAILED)
        )
    assert not EvalStatus.RUNNING.can_become(EvalStatus.QUEUED)
    assert set(DEPLOYMENT_TRANSITIONS) == set(DeploymentStatus)
    assert [s for s in DeploymentStatus if s.is_terminal()] == [DeploymentStatus.DELETING]
    for status in DeploymentStatus:
        assert not status.can_become(DeploymentStatus.PENDING)
        if not status.is_terminal():
            assert status.can_become(DeploymentStatus.DELETING)


def add_eval(session: Session, output_dir: str = "/nonexistent") -> Evaluation:
    row = Evaluation(
        id=new_id("eval"), project_id="default", status=EvalStatus.QUEUED.value,
        config={}, output_dir=output_dir,
    )  # fmt: skip
    session.add(row)
    session.flush()
    return row


@settings(max_examples=150, deadline=None)
@given(targets=st.lists(st.sampled_from(list(EvalStatus)), max_size=12))
def test_random_eval_status_changes_never_leave_a_terminal_state(
    sessions: sessionmaker[Session], targets: list[EvalStatus]
) -> None:
    with sessions.begin() as session:
        row = add_eval(session)
        history = [EvalStatus(row.status)]
        for target in targets:
            before = EvalStatus(row.status)
            moved = set_eval_status(row, target)
            assert moved == (before != target and before.can_become(target))
            history.append(EvalStatus(row.status))
            assert (row.finished_at is not None) == EvalStatus(row.status).is_terminal()
        for i, status in enumerate(history):
            if status.is_terminal():
                assert set(history[i:]) == {status}


@pytest.fixture(scope="module")
def eval_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("eval")
    (out / RESULTS_FILE).write_text(json.dumps({"budgets": [{"accuracy": 0.5}]}))
    return str(out)


@settings(max_examples=100, deadline=None)
@given(events=st.lists(EVENTS, max_size=15), has_results=st.booleans())
def test_random_cluster_events_and_cancels_through_the_eval_reconciler(
    sessions: sessionmaker[Session],
    eval_output: str,
    events: list[tuple[str, LaunchState | None]],
    has_results: bool,
) -> None:
    launcher = FakeLauncher()
    config = Settings(data_dir=Path(eval_output), mlflow_tracking_uri="sqlite:///unused.db")
    with sessions.begin() as session:
        eval_id = add_eval(session, eval_output if has_results else "/nonexistent").id
    seen_terminal: EvalStatus | None = None
    with patch.object(evals, "_eval_run", return_value=None):  # no MLflow at unit level
        for kind, state in events:
            if kind == "launcher" and state is not None:
                launcher.set(eval_id, state)
            elif kind == "cancel":
                with sessions.begin() as session:
                    try:
                        evals.cancel_eval(session, project_id="default", eval_id=eval_id)
                    except Conflict:
                        assert seen_terminal is not None
            else:
                evals.reconcile_evals(sessions, launcher, config)
            with sessions() as session:
                row = evals.get_eval(session, project_id="default", eval_id=eval_id)
                status = EvalStatus(row.status)
            if seen_terminal is not None:
                assert status == seen_terminal
            elif status.is_terminal():
                seen_terminal = status
            assert (row.finished_at is not None) == status.is_terminal()
            if status is EvalStatus.SUCCEEDED:
                assert has_results and row.best_accuracy == 0.5


SERVE_VIEWS = st.sampled_from(["missing", "running", "running-old", "failed", "deploying"])
DEPLOYMENT_EVENTS = st.one_of(
    SERVE_VIEWS.map(lambda v: ("sync", v)),
    st.sampled_from(["update", "delete"]).map(lambda a: (a, "")),
)


class _OneAppServe:
    """Ray Serve's view of one deployment's app, as the test sets it."""

    def __init__(self, name: str) -> None:
        self.name, self.view = name, "missing"

    def statuses(self) -> dict[str, AppStatus]:
        if self.view == "missing":
            return {}
        status = {"failed": "DEPLOY_FAILED", "deploying": "DEPLOYING"}.get(self.view, "RUNNING")
        version = "m/1" if self.view == "running-old" else "m/2"
        args = {"models": [{"model_uri": f"models:/{version}"}]}
        return {app_name(self.name): AppStatus(status, "", {}, args)}


@settings(max_examples=100, deadline=None)
@given(events=st.lists(DEPLOYMENT_EVENTS, max_size=15))
def test_random_serve_views_updates_and_deletes_move_a_deployment_by_its_machine(
    sessions: sessionmaker[Session], events: list[tuple[str, str]]
) -> None:
    name = new_id("d")
    serve = _OneAppServe(name)
    with sessions.begin() as session:
        session.add(
            Deployment(id=new_id("deploy"), project_id="default", name=name, model="m@prod",
                       config={}, status=DeploymentStatus.PENDING.value)
        )  # fmt: skip
    history = [DeploymentStatus.PENDING]
    served = False  # the deployment has served the wanted version once (degraded, not failed)
    for kind, view in events:
        with sessions.begin() as session:
            row = session.scalar(select(Deployment).where(Deployment.name == name))
            if row is None:  # deleted: only a deleting deployment goes
                assert history[-1] is DeploymentStatus.DELETING
                return
            if kind == "update" and not DeploymentStatus(row.status).is_terminal():
                set_deployment_status(row, DeploymentStatus.UPDATING, message=row.message)
            elif kind == "delete":
                set_deployment_status(row, DeploymentStatus.DELETING, message=row.message)
        if kind == "sync":
            serve.view = view
            sync_statuses(sessions, serve, {name: "m/2"}, door_refresh_s=0)  # type: ignore[arg-type]
        with sessions() as session:
            status = session.scalar(select(Deployment.status).where(Deployment.name == name))
        if status is None:
            continue
        now = DeploymentStatus(status)
        assert now == history[-1] or history[-1].can_become(now)
        if history[-1].is_terminal():
            assert now == history[-1]
        elif kind == "sync":
            failed = DeploymentStatus.DEGRADED if served else DeploymentStatus.FAILED
            expected = {
                "missing": DeploymentStatus.DEPLOYING, "running": DeploymentStatus.RUNNING,
                "running-old": DeploymentStatus.DEPLOYING, "deploying": DeploymentStatus.DEPLOYING,
                "failed": failed,
            }[view]  # fmt: skip
            assert now == expected
            served = served or now is DeploymentStatus.RUNNING
        history.append(now)
