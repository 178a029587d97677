"""Leader election on the real PostgreSQL (and the SQLite single-replica lock): one replica
leads, a lapsed lease passes to another, and an ex-leader's fenced commits fail."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError

from tests.conftest import LiveServer, free_port
from tests.platform.conftest import make_settings
from tests.platform.fakes import FakeLauncher, FakeServe
from thinkforge.platform.app import create_app
from thinkforge.platform.db import make_engine, make_sessionmaker
from thinkforge.platform.leader import (
    FileLockLeadership,
    LeaseElection,
    NotLeader,
    SingleReplicaOnly,
    fenced,
)
from thinkforge.platform.migrations import upgrade
from thinkforge.platform.models import Project
from thinkforge.platform.reconciler import Reconciler

LEASE_S = 2.0
APP_LEASE_S = 5.0  # whole apps stall for a second now and then on a loaded machine


@pytest.fixture
def engine(pg_database: str) -> Iterator[Engine]:
    upgrade(pg_database)
    engine = make_engine(pg_database)
    yield engine
    engine.dispose()


def replicas(engine: Engine) -> tuple[LeaseElection, LeaseElection]:
    return (
        LeaseElection(engine, replica_id="replica-a", lease_s=LEASE_S),
        LeaseElection(engine, replica_id="replica-b", lease_s=LEASE_S),
    )


def project_names(engine: Engine) -> list[str]:
    with make_sessionmaker(engine)() as session:
        return list(session.scalars(select(Project.id)))


def test_one_replica_leads_and_another_takes_over_a_lapsed_lease(engine: Engine) -> None:
    a, b = replicas(engine)
    a.tick()
    b.tick()
    assert a.is_leader() and not b.is_leader()
    info = b.info()
    assert info.leader == "replica-a" and info.token == 1 and not info.is_leader
    a.tick()  # renewing keeps the token
    assert a.info().token == 1 and a.is_leader()
    time.sleep(LEASE_S + 0.2)  # a stops renewing: frozen, or dead
    assert not a.is_leader()  # its own clock says so before anyone takes over
    b.tick()
    assert b.is_leader() and b.info().token == 2
    a.tick()  # the old leader comes back: its renewal finds another holder
    assert not a.is_leader() and a.info().leader == "replica-b"


def test_an_ex_leaders_fenced_commit_fails_and_writes_nothing(engine: Engine) -> None:
    a, b = replicas(engine)
    a.tick()
    writes = fenced(make_sessionmaker(engine), a)
    with writes.begin() as session:  # while it leads, fenced writes go through
        session.add(Project(id="written-while-leading"))
    session = writes()
    session.add(Project(id="written-after-the-lease"))  # decided on, then the leader froze
    time.sleep(LEASE_S + 0.2)
    b.tick()
    assert b.is_leader()
    with pytest.raises(NotLeader, match="lost the reconciler lease"):
        session.commit()
    session.close()
    assert project_names(engine) == ["written-while-leading"]


def test_a_frozen_leader_holding_the_lease_row_cannot_block_a_takeover(engine: Engine) -> None:
    """A leader that froze between its fence check and its commit holds the lease row; the
    database ends that idle transaction after one lease, the takeover goes on, and the
    late commit fails."""
    a, b = replicas(engine)
    a.tick()
    session = fenced(make_sessionmaker(engine), a)()
    session.add(Project(id="frozen-write"))
    a.fence(session)  # the commit's own check, then the process stops
    took: list[float] = []
    started = time.monotonic()
    taker = threading.Thread(target=lambda: (b.tick(), took.append(time.monotonic() - started)))
    time.sleep(LEASE_S + 0.2)
    taker.start()
    taker.join(timeout=10)
    assert b.is_leader() and took and took[0] < 2 * LEASE_S  # a lease after the freeze
    with pytest.raises((NotLeader, DBAPIError)):
        session.commit()
    session.close()
    assert project_names(engine) == []


def test_a_stopping_leader_hands_the_lease_over_at_once(engine: Engine) -> None:
    a, b = replicas(engine)
    a.tick()
    a.stop()
    b.tick()
    assert b.is_leader() and b.info().token == 2


def test_only_the_leaders_reconciler_runs_its_tasks(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    ran = {"replica-a": 0, "replica-b": 0}
    loops = []
    for election in replicas(engine):
        election.tick()

        def task(name: str = election.replica_id) -> None:
            ran[name] += 1

        loops.append(
            Reconciler(sessions, FakeLauncher(), interval_s=0.05, tasks=[task], leader=election)
        )
    for loop in loops:
        loop.start()
    time.sleep(0.5)
    for loop in loops:
        loop.stop()
    assert ran["replica-a"] > 0 and ran["replica-b"] == 0
    assert replicas(engine)[0].info().reconciled_at is not None


def test_a_second_replica_on_one_sqlite_file_refuses_and_says_why(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'thinkforge.db'}")
    first = FileLockLeadership(engine, replica_id="first")
    second = FileLockLeadership(engine, replica_id="second")
    first.start()
    with pytest.raises(SingleReplicaOnly, match=r"replica first .*PostgreSQL"):
        second.start()
    assert first.is_leader() and not second.is_leader()
    first.stop()
    second.start()  # the lock goes with the process that held it
    assert second.info().is_leader
    second.stop()


def test_thinkforge_up_on_a_sqlite_file_another_replica_holds_refuses(tmp_path: Path) -> None:
    """The lock a running `thinkforge up` holds (taken here, as that process would) makes a
    second `thinkforge up` on the same file exit, saying why, before it reconciles."""
    engine = make_engine(f"sqlite:///{tmp_path / 'thinkforge.db'}")
    running = FileLockLeadership(engine, replica_id="first")
    running.start()
    env = {
        **os.environ,
        "THINKFORGE_DATA_DIR": str(tmp_path),
        "THINKFORGE_RAY_ADDRESS": f"http://127.0.0.1:{free_port()}",  # no Ray needed to refuse
    }
    try:
        second = subprocess.run(
            [sys.executable, "-m", "thinkforge.cli", "up", "--port", str(free_port())],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    finally:
        running.stop()
    assert second.returncode != 0
    output = second.stdout + second.stderr
    assert "replica first" in output and "SQLite serves one control-plane replica" in output
    assert "THINKFORGE_DATABASE_URL" in output


def test_readyz_and_metrics_name_the_leader_and_follow_a_handover(
    tmp_path: Path, pg_database: str
) -> None:
    """Two apps on one database: both ready, both name the same leader; stopping the
    leader hands over."""
    apps = [
        create_app(
            make_settings(tmp_path, pg_database).model_copy(
                update={"start_reconciler": True, "leader_lease_s": APP_LEASE_S,
                        "replica_id": name, "reconcile_interval_s": 0.1}
            ),
            launcher=FakeLauncher(),
            serve=FakeServe(),
        )
        for name in ("replica-a", "replica-b")
    ]  # fmt: skip
    second = LiveServer(apps[1])
    with LiveServer(apps[0]) as first, second:
        ready = [httpx.get(f"{s.url}/readyz").json() for s in (first, second)]
        assert [r["status"] for r in ready] == ["ok", "ok"]
        assert {r["reconciler"]["leader"] for r in ready} == {"replica-a"}
        assert [r["reconciler"]["is_leader"] for r in ready] == [True, False]
        # the first pass creates the MLflow store the mirror reads: seconds, on a busy machine
        wait_for(lambda: reconciler(second)["last_reconciled_at"] is not None, timeout=60)
        metrics = httpx.get(f"{second.url}/metrics").text
        assert 'thinkforge_reconciler_leader{leader="replica-a",replica="replica-b"} 0.0' in metrics
        assert "thinkforge_reconciler_last_pass_timestamp_seconds" in metrics
        first.__exit__()  # a graceful stop hands the lease over: no wait for it to lapse
        wait_for(lambda: reconciler(second)["is_leader"], timeout=APP_LEASE_S / 3 + 2)
        assert 'replica="replica-b"} 1.0' in httpx.get(f"{second.url}/metrics").text


def reconciler(server: LiveServer) -> dict[str, Any]:
    return dict(httpx.get(f"{server.url}/readyz").json()["reconciler"])


def wait_for(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
