"""Which control-plane replica runs the reconciler loops: leader election in the database.

Every replica serves the REST API; one, the leader, runs the loops that write what the
cluster says (jobs, evaluations, deployments, the registry mirror, purges).

PostgreSQL: a lease row (``leader_leases``) that the leader renews every third of
``leader_lease_s``; a replica takes it over once it has not been renewed for a whole
lease, and every takeover bumps the row's fencing ``token``. The loops write through
``fenced(sessions)``: just before each commit the transaction reads the lease row
``FOR SHARE`` and goes on only if it still holds the lease with its token. A takeover
updates that row, so it waits for a fenced commit in flight, and a commit that comes after
it fails with ``NotLeader``: a paused or partitioned ex-leader never writes after losing
the lease. Timeouts on those transactions keep a frozen leader from holding the lease row
for longer than a lease, or stalling its successor on a job's row. Times are the
database's clock, never a replica's.

SQLite: one replica only. The leader holds an exclusive file lock next to the database
file for as long as it runs; a second process on the same file refuses to start
(``SingleReplicaOnly``) and says why.

    leadership = leadership_for(settings, engine)
    leadership.start()                      # raises SingleReplicaOnly on a shared SQLite file
    if leadership.is_leader(): ...          # the loops ask before each task
    fenced_sessions = fenced(sessions, leadership)
    leadership.reconciled(); leadership.info()
    leadership.stop()                       # a leader hands the lease over at once
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import Engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from thinkforge.platform.db import is_sqlite
from thinkforge.platform.models import utcnow
from thinkforge.platform.schemas import LeaderStatus
from thinkforge.platform.settings import Settings

log = logging.getLogger(__name__)
LEASE = "reconciler"


class NotLeader(Exception):
    """A fenced commit by a replica that does not hold the lease (any more)."""


class SingleReplicaOnly(RuntimeError):
    """A second control plane on one SQLite database."""


@dataclass(frozen=True)
class LeaderInfo:
    """What ``/readyz`` and ``/metrics`` show: who leads, and when it last reconciled."""

    replica: str  # this replica
    leader: str | None  # the replica holding an unexpired lease, if any
    token: int | None
    reconciled_at: datetime | None

    @property
    def is_leader(self) -> bool:
        return self.leader == self.replica


class Leadership(Protocol):
    replica_id: str

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def is_leader(self) -> bool: ...
    def fence(self, session: Session) -> None: ...
    def reconciled(self) -> None: ...
    def info(self) -> LeaderInfo: ...


def default_replica_id() -> str:
    """The pod name (hostname) and pid, plus a random part: unique per process."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def leadership_for(settings: Settings, engine: Engine) -> Leadership:
    replica = settings.replica_id or default_replica_id()
    if is_sqlite(engine):
        return FileLockLeadership(engine, replica_id=replica)
    return LeaseElection(engine, replica_id=replica, lease_s=settings.leader_lease_s)


def fenced(sessions: sessionmaker[Session], leadership: Leadership) -> sessionmaker[Session]:
    """Sessions whose every commit first checks that this replica still leads."""
    fenced_sessions: sessionmaker[Session] = sessionmaker(**sessions.kw)

    @event.listens_for(fenced_sessions, "before_commit")
    def _fence(session: Session) -> None:
        leadership.fence(session)

    if isinstance(leadership, LeaseElection):
        lease_ms = int(leadership.lease_s * 1000)

        @event.listens_for(fenced_sessions, "after_begin")
        def _bound(_session: Session, _transaction: Any, connection: Any) -> None:
            # A frozen ex-leader holding a job's row stalls its successor's pass over that
            # job for one lease at most, and loses the row after three (a pass may wait on
            # MLflow inside its transaction, so not sooner).
            connection.exec_driver_sql(f"SET LOCAL lock_timeout = {lease_ms}")
            connection.exec_driver_sql(
                f"SET LOCAL idle_in_transaction_session_timeout = {3 * lease_ms}"
            )

    return fenced_sessions


class LeaseElection:
    """The PostgreSQL lease (see the module docstring); a daemon thread renews or acquires."""

    def __init__(self, engine: Engine, *, replica_id: str, lease_s: float) -> None:
        self.replica_id = replica_id
        self.lease_s = lease_s
        self._engine = engine
        self._token: int | None = None
        self._valid_until = float("-inf")  # monotonic; never later than the row's expiry
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.tick()
        self._thread = threading.Thread(target=self._run, name="thinkforge-leader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._release()

    def is_leader(self) -> bool:
        with self._lock:
            return self._token is not None and time.monotonic() < self._valid_until

    def fence(self, session: Session) -> None:
        token = self._token
        if token is None:
            raise NotLeader(f"replica {self.replica_id} does not hold the reconciler lease")
        # From here to the commit the lease row is held: a leader frozen in between must
        # not hold up a takeover for longer than a lease.
        lease_ms = int(self.lease_s * 1000)
        session.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = {lease_ms}"))
        held = session.execute(
            text(
                "SELECT token FROM leader_leases WHERE name = :name AND holder = :me "
                "AND token = :token AND expires_at > clock_timestamp() FOR SHARE"
            ),
            {"name": LEASE, "me": self.replica_id, "token": token},
        ).first()
        if held is None:
            raise NotLeader(f"replica {self.replica_id} lost the reconciler lease (token {token})")

    def reconciled(self) -> None:
        token = self._token
        if token is None:
            return
        self._update_held(token, "reconciled_at = clock_timestamp()")

    def info(self) -> LeaderInfo:
        with self._engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT holder, token, reconciled_at, expires_at > clock_timestamp() "
                    "FROM leader_leases WHERE name = :name"
                ),
                {"name": LEASE},
            ).first()
        if row is None:
            return LeaderInfo(self.replica_id, None, None, None)
        holder, token, reconciled_at, live = row
        return LeaderInfo(self.replica_id, holder if live else None, token, reconciled_at)

    def tick(self) -> None:
        """Renew the lease if held, else try to take it; a database error keeps what is
        held until it runs out on its own."""
        asked_at = time.monotonic()  # the row's expiry is counted from a later instant
        try:
            held = self._token
            token = self._renew(held) if held is not None else self._acquire()
        except SQLAlchemyError as exc:
            log.warning("leader election: the database did not answer (%s)", exc.__class__.__name__)
            return
        took = time.monotonic() - asked_at
        if took > self.lease_s / 3:
            log.warning("leader election: a lease round trip took %.1f s", took)
        with self._lock:
            if token is None and self._token is not None:
                log.warning("replica %s lost the reconciler lease", self.replica_id)
            elif token is not None and self._token != token:
                log.info("replica %s leads the reconciler (token %d)", self.replica_id, token)
            self._token = token
            self._valid_until = asked_at + self.lease_s if token is not None else float("-inf")

    def _acquire(self) -> int | None:
        """The first lease ever, or one that lapsed. Neither statement locks a live lease's
        row (an ``ON CONFLICT DO UPDATE`` would, and hold up the leader's renewal)."""
        params = {"name": LEASE, "me": self.replica_id, "lease": self.lease_s}
        with self._engine.begin() as conn:
            token = conn.execute(
                text(
                    "INSERT INTO leader_leases "
                    "(name, holder, token, acquired_at, renewed_at, expires_at) "
                    "VALUES (:name, :me, 1, clock_timestamp(), clock_timestamp(), "
                    "clock_timestamp() + make_interval(secs => :lease)) "
                    "ON CONFLICT (name) DO NOTHING RETURNING token"
                ),
                params,
            ).scalar()
            if token is not None:
                return int(token)
            return conn.execute(
                text(
                    "UPDATE leader_leases SET holder = :me, token = token + 1, "
                    "acquired_at = clock_timestamp(), renewed_at = clock_timestamp(), "
                    "expires_at = clock_timestamp() + make_interval(secs => :lease) "
                    "WHERE name = :name AND expires_at <= clock_timestamp() RETURNING token"
                ),
                params,
            ).scalar()

    def _renew(self, token: int) -> int | None:
        return self._update_held(
            token,
            "renewed_at = clock_timestamp(), "
            "expires_at = clock_timestamp() + make_interval(secs => :lease)",
            lease=self.lease_s,
        )

    def _update_held(self, token: int, assignments: str, **params: object) -> int | None:
        """Update the lease row only while this replica holds it with ``token``."""
        with self._engine.begin() as conn:
            return conn.execute(
                text(
                    f"UPDATE leader_leases SET {assignments} "
                    "WHERE name = :name AND holder = :me AND token = :token RETURNING token"
                ),
                {"name": LEASE, "me": self.replica_id, "token": token, **params},
            ).scalar()

    def _release(self) -> None:
        """Let the next replica take over now rather than after a whole lease."""
        with self._lock:
            token, self._token, self._valid_until = self._token, None, float("-inf")
        if token is None:
            return
        try:
            self._update_held(token, "expires_at = clock_timestamp()")
        except SQLAlchemyError:
            log.warning("could not hand the reconciler lease over; it runs out on its own")

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            self.tick()


class FileLockLeadership:
    """SQLite: the one replica holds ``<database>.leader`` locked while it runs."""

    def __init__(self, engine: Engine, *, replica_id: str) -> None:
        self.replica_id = replica_id
        database = make_url(str(engine.url)).database
        in_memory = not database or database == ":memory:"
        self._path = None if in_memory else Path(f"{database}.leader")
        self._file: IO[str] | None = None
        self._started = False
        self._reconciled_at: datetime | None = None

    def start(self) -> None:
        self._started = self._path is None  # a private in-memory database: no one else opens it
        if self._path is None:
            return
        handle = open(self._path, "a+")  # noqa: SIM115 (held open until stop)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise SingleReplicaOnly(
                f"{holder} already runs the reconciler on the SQLite database "
                f"{self._path.with_suffix('')}; SQLite serves one control-plane replica. "
                "Stop that one, or point every replica at PostgreSQL "
                "(THINKFORGE_DATABASE_URL) to run several."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"thinkforge replica {self.replica_id} (pid {os.getpid()})\n")
        handle.flush()
        self._file, self._started = handle, True

    def stop(self) -> None:
        self._started = False
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None

    def is_leader(self) -> bool:
        return self._started

    def fence(self, session: Session) -> None:
        return None

    def reconciled(self) -> None:
        self._reconciled_at = utcnow()

    def info(self) -> LeaderInfo:
        leader = self.replica_id if self._started else None
        return LeaderInfo(self.replica_id, leader, None, self._reconciled_at)


def leader_status(leadership: Leadership) -> LeaderStatus | None:
    """For ``/readyz``: None when the database cannot say (readiness reports that apart)."""
    try:
        info = leadership.info()
    except SQLAlchemyError:
        return None
    at = info.reconciled_at
    return LeaderStatus(
        replica=info.replica,
        leader=info.leader,
        is_leader=info.is_leader,
        last_reconciled_at=int(at.timestamp()) if at is not None else None,
    )


class LeaderCollector:
    """Prometheus gauges for ``/metrics``: read from the lease row at every scrape."""

    def __init__(self, leadership: Leadership) -> None:
        self._leadership = leadership

    def collect(self) -> Iterator[Metric]:
        try:
            info = self._leadership.info()
        except SQLAlchemyError:
            return
        leads = GaugeMetricFamily(
            "thinkforge_reconciler_leader",
            "1 on the replica that runs the reconciler loops, 0 on the others",
            labels=["replica", "leader"],
        )
        leads.add_metric([info.replica, info.leader or ""], 1.0 if info.is_leader else 0.0)
        yield leads
        if info.token is not None:
            yield GaugeMetricFamily(
                "thinkforge_reconciler_lease_token",
                "The lease's fencing token: how many times leadership has changed hands",
                value=float(info.token),
            )
        if info.reconciled_at is not None:
            yield GaugeMetricFamily(
                "thinkforge_reconciler_last_pass_timestamp_seconds",
                "When the leader last finished a reconcile pass (unix time, database clock)",
                value=info.reconciled_at.timestamp(),
            )
