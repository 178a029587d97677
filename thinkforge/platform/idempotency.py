"""``Idempotency-Key`` for every POST: the first response is kept and replayed.

Same key and same request: the first response again. Same key, other request: 422.
Same key while the first is still running: 409. The response is stored in the same
transaction as the work, so a crash leaves neither; a request that fails leaves no key.
Keys past their time (``ttl_s`` once answered, ``IN_FLIGHT_LEASE`` while in flight) are
deleted by ``purge_expired``, which the reconciler runs on a schedule.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from thinkforge.platform.errors import IdempotencyInFlight, IdempotencyMismatch, InvalidRequest
from thinkforge.platform.models import IdempotencyKey, utcnow

IN_FLIGHT_LEASE = timedelta(minutes=10)
Handler = Callable[[Session], tuple[int, dict[str, Any]]]


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def run_idempotent(
    sessions: sessionmaker[Session],
    *,
    project_id: str,
    key: str | None,
    method: str,
    path: str,
    request_fingerprint: str,
    ttl_s: int,
    handler: Handler,
) -> tuple[int, dict[str, Any]]:
    """Run ``handler`` in one transaction, at most once per idempotency key."""
    if key is None:
        with sessions.begin() as session:
            return handler(session)
    claim = _claim(sessions, project_id, key, method, path, request_fingerprint, ttl_s)
    if isinstance(claim, tuple):
        return claim
    try:
        with sessions.begin() as session:
            status, body = handler(session)
            _keep_response(session, claim, status, body)
        return status, body
    except BaseException:
        _release(sessions, claim)
        raise


def run_idempotent_action(
    sessions: sessionmaker[Session],
    *,
    project_id: str,
    key: str | None,
    method: str,
    path: str,
    request_fingerprint: str,
    ttl_s: int,
    action: Callable[[], tuple[int, dict[str, Any]]],
) -> tuple[int, dict[str, Any]]:
    """``run_idempotent`` for work that opens its own transactions or calls out (an alias
    move in MLflow, a Serve rollout): at most once per key; the response is stored right
    after. A crash in between leaves the key in flight until its lease ends."""
    if key is None:
        return action()
    claim = _claim(sessions, project_id, key, method, path, request_fingerprint, ttl_s)
    if isinstance(claim, tuple):
        return claim
    try:
        status, body = action()
    except BaseException:
        _release(sessions, claim)
        raise
    with sessions.begin() as session:
        _keep_response(session, claim, status, body)
    return status, body


def _claim(
    sessions: sessionmaker[Session],
    project_id: str,
    key: str,
    method: str,
    path: str,
    request_fingerprint: str,
    ttl_s: int,
) -> int | tuple[int, dict[str, Any]]:
    """Insert an in-flight row and return its seq, or return the stored response."""
    if not key or len(key) > 255 or "\x00" in key:
        raise InvalidRequest("Idempotency-Key must be 1 to 255 characters", param="Idempotency-Key")
    for _ in range(5):
        try:
            with sessions.begin() as session:
                row = session.scalar(
                    select(IdempotencyKey)
                    .where(IdempotencyKey.project_id == project_id, IdempotencyKey.key == key)
                    .with_for_update()
                )
                if row is not None and not _expired(row, ttl_s):
                    return _existing(row, method, path, request_fingerprint)
                if row is not None:
                    session.delete(row)
                    session.flush()
                fresh = IdempotencyKey(
                    project_id=project_id,
                    key=key,
                    method=method,
                    path=path,
                    fingerprint=request_fingerprint,
                )
                session.add(fresh)
                session.flush()
                return fresh.seq
        except IntegrityError:
            continue  # another request inserted the same key first: look again
    raise IdempotencyInFlight("a request with this Idempotency-Key is in progress; retry shortly")


def _keep_response(session: Session, claim: int, status: int, body: dict[str, Any]) -> None:
    session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.seq == claim)
        .values(state="done", response_status=status, response_body=body)
    )


def _release(sessions: sessionmaker[Session], claim: int) -> None:
    """A request that failed keeps no key: the same key may be used again."""
    with sessions.begin() as session:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.seq == claim))


def purge_expired(sessions: sessionmaker[Session], *, ttl_s: int) -> int:
    """Delete every key that ``_claim`` would treat as expired; returns how many."""
    now = utcnow()
    with sessions.begin() as session:
        result = session.execute(
            delete(IdempotencyKey).where(
                or_(
                    and_(
                        IdempotencyKey.state == "in_flight",
                        IdempotencyKey.created_at < now - IN_FLIGHT_LEASE,
                    ),
                    and_(
                        IdempotencyKey.state != "in_flight",
                        IdempotencyKey.created_at < now - timedelta(seconds=ttl_s),
                    ),
                )
            )
        )
    return int(result.rowcount)  # type: ignore[attr-defined]


def _expired(row: IdempotencyKey, ttl_s: int) -> bool:
    age = utcnow() - row.created_at
    if row.state == "in_flight":
        return age > IN_FLIGHT_LEASE
    return age > timedelta(seconds=ttl_s)


def _existing(
    row: IdempotencyKey, method: str, path: str, request_fingerprint: str
) -> tuple[int, dict[str, Any]]:
    if (row.method, row.path, row.fingerprint) != (method, path, request_fingerprint):
        raise IdempotencyMismatch(
            "this Idempotency-Key was used for a different request; use a new key",
            param="Idempotency-Key",
        )
    if row.state != "done" or row.response_status is None or row.response_body is None:
        raise IdempotencyInFlight(
            "a request with this Idempotency-Key is in progress; retry shortly",
            param="Idempotency-Key",
        )
    return row.response_status, row.response_body
