"""Moving aliases (promotion, rollback, deletion) safely, with an audit row for each move.

A promotion checks the version first (READY, every manifest file present with its
sha256) and leaves the alias where it was, with the reason, if anything is wrong. Moves
of one alias take turns on a row lock, so concurrent promotions both answer, the alias
ends on one of them, and the audit log chains ``from -> to`` in the order they happened.

    move = promote(sessions, registry, actor=principal, name="sums", alias="production", version=3)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from thinkforge.platform.auth import Principal
from thinkforge.platform.errors import Conflict
from thinkforge.platform.models import AuditEntry, ModelAlias, new_id
from thinkforge.platform.pagination import page
from thinkforge.platform.registry import ModelRegistry, VersionStatus
from thinkforge.platform.trust import lock_alias, pinned_sha

OnMoved = Callable[[str, str, int | None], None]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AliasMove:
    name: str
    alias: str
    previous: int | None
    version: int | None
    audit_id: str


def check_promotable(
    sessions: sessionmaker[Session],
    registry: ModelRegistry,
    name: str,
    version: int,
    policy: EvalPolicy | None = None,
) -> None:
    """READY, and its files match the manifest sha256 thinkforge pinned (not MLflow's tag)."""
    detail = registry.get_version(name, version)
    if detail.status is not VersionStatus.READY:
        raise Conflict(
            f"{name}/{version} is {detail.status.value}, not READY; wait for it or pick another",
            param="version",
            code="version_not_ready",
        )
    pin = pinned_sha(sessions, registry, name, version)
    problems = registry.verify_version(name, version, manifest_sha256=pin)
    if problems:
        shown = "; ".join(problems[:5])
        raise Conflict(
            f"{name}/{version} failed its integrity check, so the alias was not moved: {shown}",
            param="version",
            code="integrity_check_failed",
        )
    if policy is not None:
        policy.check(f"{name}/{version}")


@dataclass(frozen=True)
class EvalPolicy:
    """Promotion needs a succeeded evaluation of the version at ``min_accuracy`` or more."""

    sessions: sessionmaker[Session]
    min_accuracy: float

    def check(self, model_version: str) -> None:
        from thinkforge.platform.evals import passing_eval

        with self.sessions() as session:
            if passing_eval(session, model_version, self.min_accuracy) is None:
                raise Conflict(
                    f"{model_version} has no succeeded evaluation with accuracy >= "
                    f"{self.min_accuracy}; run one (POST /v1/evals) on a deployment of it first",
                    param="version",
                    code="evaluation_required",
                )


def promote(
    sessions: sessionmaker[Session],
    registry: ModelRegistry,
    *,
    actor: Principal,
    name: str,
    alias: str,
    version: int,
    reason: str | None = None,
    on_moved: OnMoved | None = None,
    policy: EvalPolicy | None = None,
) -> AliasMove:
    registry.resolve(f"{name}/{version}")  # 404 for a model or version that does not exist
    check_promotable(sessions, registry, name, version, policy)
    with sessions.begin() as session:
        lock_alias(session, name, alias)
        if registry.get_alias(name, alias) == version:  # already there: nothing moves
            return AliasMove(name, alias, version, version, audit_id="")
        previous = registry.set_alias(name, alias, version)
        move = _record(session, actor, "promote", name, alias, previous, version, reason)
    _notify(on_moved, name, alias, version)
    return move


def rollback(
    sessions: sessionmaker[Session],
    registry: ModelRegistry,
    *,
    actor: Principal,
    name: str,
    alias: str,
    reason: str | None = None,
    on_moved: OnMoved | None = None,
) -> AliasMove:
    current, target = _rollback_target(sessions, registry, name, alias)
    check_promotable(sessions, registry, name, target)
    with sessions.begin() as session:
        lock_alias(session, name, alias)
        if registry.get_alias(name, alias) != current:
            raise Conflict(f"{name}@{alias} moved meanwhile; look again and retry", param="alias")
        previous = registry.set_alias(name, alias, target)
        move = _record(session, actor, "rollback", name, alias, previous, target, reason)
    _notify(on_moved, name, alias, target)
    return move


def _rollback_target(
    sessions: sessionmaker[Session], registry: ModelRegistry, name: str, alias: str
) -> tuple[int | None, int]:
    """Undo the last move that is not yet undone: replay the alias's audit history as a stack.

    Rolling back twice walks further back; it never re-promotes the version just rolled
    back from.
    """
    current = registry.get_alias(name, alias)
    with sessions() as session:
        rows = session.scalars(
            select(AuditEntry)
            .where(AuditEntry.target == f"{name}@{alias}")
            .order_by(AuditEntry.seq)
        ).all()
    earlier: list[str | None] = []
    for row in rows:
        if row.action == "external_change":  # put back by the guard: no move to undo
            continue
        if row.action == "rollback":
            if earlier:
                earlier.pop()
        else:
            earlier.append(row.from_value)
    if not earlier or earlier[-1] is None:
        raise Conflict(
            f"{name}@{alias} has no earlier version on record to roll back to", param="alias"
        )
    return current, int(earlier[-1])


def delete_alias(
    sessions: sessionmaker[Session],
    registry: ModelRegistry,
    *,
    actor: Principal,
    name: str,
    alias: str,
    reason: str | None = None,
    on_moved: OnMoved | None = None,
) -> AliasMove:
    with sessions.begin() as session:
        lock_alias(session, name, alias)
        previous = registry.delete_alias(name, alias)
        move = _record(session, actor, "delete", name, alias, previous, None, reason)
    _notify(on_moved, name, alias, None)
    return move


def list_audit(
    session: Session, *, project_id: str, target: str | None, after: str | None, limit: int
) -> tuple[list[AuditEntry], bool]:
    """A page of the project's audit trail, newest first; ``target`` is ``name@alias``."""
    stmt = select(AuditEntry).where(AuditEntry.project_id == project_id)
    if target is not None:
        stmt = stmt.where(AuditEntry.target == target)
    return page(session, stmt, AuditEntry, after=after, limit=limit)


def _notify(on_moved: OnMoved | None, name: str, alias: str, version: int | None) -> None:
    """Roll what follows the alias now; if that fails the reconciler rolls it later."""
    if on_moved is None:
        return
    try:
        on_moved(name, alias, version)
    except Exception:  # the alias has moved and is audited: the answer is still a success
        log.exception("rolling deployments after %s@%s moved failed", name, alias)


def _record(
    session: Session,
    actor: Principal,
    action: str,
    name: str,
    alias: str,
    previous: int | None,
    version: int | None,
    reason: str | None,
) -> AliasMove:
    row = session.scalar(
        select(ModelAlias).where(ModelAlias.name == name, ModelAlias.alias == alias)
    )
    if row is not None:
        row.version = version
    entry = AuditEntry(
        id=new_id("audit"),
        project_id=actor.project_id,
        actor=f"{actor.project_id}/{actor.key_id}",
        action=action,
        target=f"{name}@{alias}",
        from_value=None if previous is None else str(previous),
        to_value=None if version is None else str(version),
        reason=reason,
    )
    session.add(entry)
    session.flush()
    return AliasMove(name, alias, previous, version, entry.id)
