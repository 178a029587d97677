"""The reconciler: brings every unfinished job's row in line with what the cluster says.

The database is the record; the launcher (Ray) and the tracker (MLflow, checkpoints) are
asked again on every pass and never trusted to remember. After a control-plane restart
the first pass picks every non-terminal job up again; submissions are idempotent on the
job id, so none is started twice. With several control-plane replicas only the leader's
loop runs passes, writing through sessions fenced by its lease (``platform/leader.py``).

    reconciler = Reconciler(sessions, launcher, tracker=tracker, interval_s=2.0, leader=leadership)
    reconciler.start(); ...; reconciler.stop()
    reconcile_once(sessions, launcher)          # one pass, for tests and the CLI
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from thinkforge.platform.jobs import add_event, advance_job, fail, set_status, submit
from thinkforge.platform.launcher import JobLauncher, LaunchState, LaunchStatus
from thinkforge.platform.leader import Leadership, NotLeader
from thinkforge.platform.models import Checkpoint, Job
from thinkforge.platform.status import FailureKind, JobStatus

log = logging.getLogger(__name__)


class ProgressTracker(Protocol):
    """Turns a run's metrics, checkpoints and registered model into rows for one job:
    ``fetch`` asks the outside systems (slow; no transaction open), ``apply`` writes."""

    def fetch(self, job: Job, *, final: bool) -> Any: ...

    def apply(self, session: Session, job: Job, progress: Any) -> None: ...


def reconcile_once(
    sessions: sessionmaker[Session], launcher: JobLauncher, tracker: ProgressTracker | None = None
) -> None:
    active = [s.value for s in JobStatus if not s.is_terminal()]
    with sessions() as session:
        pending = list(
            session.scalars(select(Job.id).where(Job.status.in_(active)).order_by(Job.seq))
        )
    for job_id in pending:
        try:
            _reconcile_job(sessions, launcher, tracker, job_id)
        except NotLeader:
            raise
        except Exception:  # one bad job must not stop the others
            log.exception("reconciling job %s failed", job_id)


def _reconcile_job(
    sessions: sessionmaker[Session],
    launcher: JobLauncher,
    tracker: ProgressTracker | None,
    job_id: str,
) -> None:
    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        if job is None:
            return
        submitted = job.submitted_at is not None
    if not submitted:
        advance_job(sessions, launcher, job_id)
        return
    status = launcher.status(job_id)
    with sessions() as session:  # the status may have moved while Ray was asked (a cancel)
        job.status = session.scalar(select(Job.status).where(Job.id == job_id)) or job.status
    if status.state is LaunchState.UNKNOWN and job.status == JobStatus.QUEUED.value:
        submit(sessions, launcher, job)  # claimed but never reached the cluster: submit again
        return
    if job.status == JobStatus.CANCELLING.value and status.state in (
        LaunchState.PENDING,
        LaunchState.RUNNING,
    ):
        launcher.cancel(job_id)
    progress = None
    if tracker is not None and status.state is not LaunchState.PENDING:
        final = status.state in (LaunchState.SUCCEEDED, LaunchState.FAILED, LaunchState.STOPPED)
        try:  # before the row lock: on SQLite a write transaction holds every request
            progress = tracker.fetch(job, final=final)
        except Exception:  # MLflow down must not hold back what Ray says about the run
            log.exception("job %s: reading progress failed; status still applied", job.id)
    with sessions.begin() as session:
        row = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if row is None or JobStatus(row.status).is_terminal():
            return
        resubmit = _apply(session, row, status, tracker, progress)
    if resubmit:  # outside the row lock: the launcher may be slow
        with sessions() as session:
            row = session.scalar(select(Job).where(Job.id == job_id))
        if row is not None:
            submit(sessions, launcher, row)


def _apply(
    session: Session,
    job: Job,
    status: LaunchStatus,
    tracker: ProgressTracker | None,
    progress: Any,
) -> bool:
    """Bring the row in line with ``status``; True when the run must be submitted again."""
    state = status.state
    if tracker is not None and progress is not None:
        try:
            with session.begin_nested():
                tracker.apply(session, job, progress)
        except Exception:
            log.exception("job %s: recording progress failed; status still applied", job.id)
    if state is LaunchState.PENDING and status.waiting and job.status == JobStatus.QUEUED.value:
        digest = hashlib.sha256(json.dumps(status.waiting, sort_keys=True).encode()).hexdigest()
        add_event(
            session, job.id, status.message or "Waiting for resources", level="warning",
            type="waiting", data=status.waiting, dedupe_key=f"waiting:{digest[:16]}",
        )  # fmt: skip
    elif state is LaunchState.RUNNING:
        set_status(session, job, JobStatus.RUNNING, message="Training started")
    elif state is LaunchState.SUCCEEDED:
        set_status(session, job, JobStatus.SUCCEEDED, message="Job succeeded")
    elif state is LaunchState.FAILED:
        kind = _failure_kind(f"{status.message or ''}\n{status.log_tail or ''}")
        detail = failure_summary(status.message)
        if status.log_tail:  # the log stays with the job, for those who may read its events
            add_event(
                session, job.id, "The run's log, last part (in data.log)", level="error",
                type="log", data={"log": status.log_tail}, dedupe_key="log",
            )  # fmt: skip
            detail += "; the end of its log is in the job's events"
        fail(session, job, kind, detail)
    elif state is LaunchState.STOPPED:
        set_status(session, job, JobStatus.CANCELLED, message="Job cancelled; the run was stopped")
    elif state is LaunchState.UNKNOWN:
        if job.status == JobStatus.CANCELLING.value:
            set_status(session, job, JobStatus.CANCELLED, message="Job cancelled")
        elif job.retries < job.max_retries:
            _record_retry(session, job)
            return True
        else:
            spent = f"{job.max_retries} {'retry' if job.max_retries == 1 else 'retries'}"
            fail(session, job, FailureKind.LOST, f"the cluster lost this run; its {spent} spent")
    return False


def _record_retry(session: Session, job: Job) -> None:
    """The run is gone (a head restart, say): one retry, which resumes where the job's
    checkpoints end (the training code finds them by the job id)."""
    job.retries += 1
    step = session.scalar(select(func.max(Checkpoint.step)).where(Checkpoint.job_id == job.id))
    where = f"its checkpoint at step {step}" if step is not None else "the start (no checkpoint)"
    add_event(
        session, job.id,
        f"The cluster lost the run; resubmitted from {where} (retry {job.retries} of "
        f"{job.max_retries})",
        level="warning", type="retry",
        data={"retry": job.retries, "max_retries": job.max_retries, "checkpoint_step": step},
        dedupe_key=f"retry:{job.retries}",
    )  # fmt: skip


def failure_summary(message: str | None, limit: int = 200) -> str:
    """One short line for ``error.message``: Ray's own message carries the whole log."""
    line = (message or "").strip().splitlines()[0] if (message or "").strip() else ""
    line = line.split(", last available logs", 1)[0].rstrip(" :") or "the run failed"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def every(interval_s: float, task: Callable[[], object]) -> Callable[[], None]:
    """A reconciler task that runs ``task`` on the first pass, then at most every ``interval_s``."""
    last = float("-inf")

    def throttled() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= interval_s:
            last = now
            task()

    return throttled


class Reconciler:
    """Runs ``reconcile_once`` every ``interval_s`` seconds in a daemon thread."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        launcher: JobLauncher,
        *,
        tracker: ProgressTracker | None = None,
        interval_s: float = 2.0,
        tasks: list[Callable[[], None]] | None = None,
        leader: Leadership | None = None,
    ) -> None:
        self._sessions = sessions
        self._launcher = launcher
        self._tracker = tracker
        self._interval = interval_s
        self._tasks = tasks or []
        self._leader = leader
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="thinkforge-reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _jobs_pass(self) -> None:
        reconcile_once(self._sessions, self._launcher, self._tracker)

    def _leads(self) -> bool:
        return self._leader is None or self._leader.is_leader()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._leads():
                self._pass()
            self._stop.wait(self._interval)

    def _pass(self) -> None:
        for task in [self._jobs_pass, *self._tasks]:
            if not self._leads():  # lost the lease mid-pass: a fenced commit would fail anyway
                return
            try:
                task()
            except NotLeader as exc:
                log.info("reconcile pass stopped: %s", exc)
                return
            except Exception:  # the loop outlives any single failure
                log.exception("reconcile pass failed")
        if self._leader is not None:
            try:
                self._leader.reconciled()
            except Exception:
                log.exception("recording the reconcile pass failed")


def _failure_kind(detail: str) -> FailureKind:
    """training_failed, unless the job's error line names a more precise code."""
    for kind in (FailureKind.CHECKPOINT_INCOMPATIBLE, FailureKind.INVALID_MODEL):
        if f"[{kind.value}]" in detail:  # INVALID_MODEL: a LoRA target the base lacks
            return kind
    return FailureKind.TRAINING_FAILED
