"""What fine-tune jobs, evaluations and distillations share: each is one Ray Job whose
submission id is the row's id, launched and cancelled by the same steps.

    launch_run(launcher, spec, failed=..., launched=...)   # from the reconciler or a request
    target = cancel_target(status, launched=..., what="job ftjob-1", param=...)
    reconcile_rows(sessions, Evaluation, terminal=..., advance=..., run_key_id=...)
    submit_row(sessions, launcher, Evaluation, row.seq, build_spec=..., fail=...)
    move_run(row, EvalStatus.RUNNING, what="evaluation")
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from thinkforge.platform.errors import Conflict
from thinkforge.platform.launcher import CannotFit, JobLauncher, LaunchSpec
from thinkforge.platform.models import ApiKey, Distillation, Evaluation, utcnow
from thinkforge.platform.status import DistillStatus, EvalStatus, JobStatus, moves

log = logging.getLogger(__name__)
RunStatus = TypeVar("RunStatus", JobStatus, EvalStatus, DistillStatus)
KeyedRun = TypeVar("KeyedRun", Evaluation, Distillation)


def launch_run(
    launcher: JobLauncher,
    spec: LaunchSpec,
    *,
    failed: Callable[[str], None],
    launched: Callable[[], bool],
    too_large: Callable[[str], None] | None = None,
) -> None:
    """Submit the run. A launcher error goes to ``failed`` (with the reason, for the row's
    error), a run larger than the whole cluster to ``too_large`` when given; after a
    submission ``launched`` records it and says whether the row was cancelled meanwhile,
    in which case the run is stopped at once. A second submission of one id is a no-op
    in the launcher, so a crash between the two steps is safe."""
    try:
        launcher.submit(spec)
    except CannotFit as exc:  # not a fault: the cluster is too small for what it asks
        (too_large or failed)(str(exc))
        return
    except Exception as exc:  # any launcher failure ends the run, with the reason kept
        log.exception("%s: launch failed", spec.job_id)
        failed(f"could not start the run: {exc}")
        return
    if launched():
        launcher.cancel(spec.submission_id)  # cancelled while the submission was on its way


def cancel_target(
    status: RunStatus, *, launched: bool, what: str, param: str | None = None
) -> RunStatus | None:
    """Where a cancel takes a run in ``status``: cancelled at once if nothing was launched,
    cancelling while Ray stops it, None if it is cancelling already (a repeated cancel).
    A run that ended cannot be cancelled (409)."""
    if status.is_terminal():
        raise Conflict(f"{what} already ended ({status.value}); nothing to cancel", param=param)
    kind = type(status)
    if status is kind.CANCELLING:
        return None
    return kind.CANCELLING if launched else kind.CANCELLED


def is_cancelled(status: str) -> bool:
    """A row cancelled (or being cancelled) by the time its submission returned."""
    return status in (JobStatus.CANCELLING.value, JobStatus.CANCELLED.value)


def move_run(
    row: KeyedRun, target: RunStatus, *, what: str, error: dict[str, Any] | None = None
) -> bool:
    """Move an evaluation's or a distillation's ``row`` to ``target`` if its status
    machine allows it; returns whether it moved. An ``error`` is kept with any status (a
    stopped run's reason, a mixed-version note); a terminal status stamps ``finished_at``."""
    if not moves(type(target)(row.status), target, what=f"{what} {row.id}"):
        return False
    row.status = target.value
    if error is not None:
        row.error = error
    if target.is_terminal():
        row.finished_at = utcnow()
    return True


def reconcile_rows(
    sessions: sessionmaker[Session],
    model: type[KeyedRun],
    *,
    terminal: tuple[str, ...],
    advance: Callable[[KeyedRun], None],
    run_key_id: Callable[[str], str],
) -> None:
    """One reconciler pass over the runs of ``model`` that have not ended: ``advance``
    each (one failing must not stop the others), then revoke the front-door keys derived
    for the runs that ended (``run_key_id``: the key id of a run id), which they need no
    more."""
    with sessions() as session:
        pending = list(session.scalars(select(model).where(model.status.not_in(terminal))))
    for row in pending:
        try:
            advance(row)
        except Exception:
            log.exception("reconciling %s failed", row.id)
    with sessions.begin() as session:
        keys = session.scalars(
            select(ApiKey)
            .join(model, model.id == ApiKey.name)
            .where(ApiKey.revoked_at.is_(None), model.status.in_(terminal))
        )
        for key in keys:
            if key.id == run_key_id(key.name):
                key.revoked_at = utcnow()


def submit_row(
    sessions: sessionmaker[Session],
    launcher: JobLauncher,
    model: type[KeyedRun],
    seq: int,
    *,
    build_spec: Callable[[], LaunchSpec],
    fail: Callable[[KeyedRun, str], None],
) -> None:
    """Launch the run of row ``seq`` as jobs do: the row counts as submitted only once
    the launcher took it. A spec that cannot be built (``ValueError``: say, a secret gone
    from the settings) or a launch that fails goes to ``fail`` with the row locked,
    unless the row was cancelled meanwhile."""

    def locked(session: Session) -> KeyedRun | None:
        return session.scalar(select(model).where(model.seq == seq).with_for_update())

    def failed(message: str) -> None:
        with sessions.begin() as session:
            current = locked(session)
            if current is not None and not is_cancelled(current.status):
                fail(current, message)

    def launched() -> bool:
        with sessions.begin() as session:
            current = locked(session)
            if current is None:
                return False
            current.submitted_at = utcnow()
            return is_cancelled(current.status)

    try:
        spec = build_spec()
    except ValueError as exc:
        failed(str(exc))
        return
    launch_run(launcher, spec, failed=failed, launched=launched)
