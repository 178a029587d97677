"""Fixtures for control-plane tests: a live API per database, with a fake launcher."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import LiveServer, seed_mlflow_store
from tests.platform.fakes import FakeLauncher, FakeServe
from thinkforge.platform.app import create_app
from thinkforge.platform.auth import ensure_project
from thinkforge.platform.db import make_engine, make_sessionmaker
from thinkforge.platform.models import Base, Job, new_id
from thinkforge.platform.settings import Settings
from thinkforge.platform.status import JobStatus

BOOTSTRAP_KEY = "tf-bootstrap-key-for-tests-0123456789abcdef"


@dataclass
class Api:
    url: str
    client: httpx.Client
    settings: Settings
    launcher: FakeLauncher
    app: object

    def keyed(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def new_key(self, project_id: str, role: str = "member") -> str:
        """A fresh API key of ``project_id`` (created if missing)."""
        from thinkforge.platform.auth import create_key

        with self.app.state.ctx.sessions.begin() as session:  # type: ignore[attr-defined]
            secret = self.settings.secret_key.get_secret_value()
            return create_key(session, secret, project_id=project_id, role=role)


def make_settings(tmp_path: Path, database_url: str, **overrides: object) -> Settings:
    fields: dict[str, object] = {"start_reconciler": False, **overrides}
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        bootstrap_api_key=BOOTSTRAP_KEY,  # type: ignore[arg-type]
        dataset_roots=[tmp_path / "datasets"],
        recipes_dir=Path(__file__).resolve().parents[2] / "recipes",
        mlflow_tracking_uri=f"sqlite:///{seed_mlflow_store(tmp_path / 'mlflow.db')}",
        mlflow_artifact_root=str(tmp_path / "artifacts"),
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[Api]:
    settings = make_settings(tmp_path, database_url)
    launcher = FakeLauncher()
    app = create_app(settings, launcher=launcher, serve=FakeServe())
    with (
        LiveServer(app) as server,
        httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {BOOTSTRAP_KEY}"}, timeout=30
        ) as client,
    ):
        yield Api(server.url, client, settings, launcher, app)


@pytest.fixture
def versions(api: Api, tmp_path: Path) -> list[str]:
    """Three registered versions of one model, registered as training jobs register them."""
    from tests.platform.test_registry_mlflow import register_job

    uri = api.settings.mlflow_tracking_uri
    root = api.settings.mlflow_artifact_root
    return [register_job(uri, tmp_path, f"ftjob-{i}", artifact_root=root) for i in (1, 2, 3)]


@contextmanager
def memory_database() -> Iterator[sessionmaker[Session]]:
    """An in-memory SQLite database with the schema and the default project (unit level)."""
    engine = make_engine("sqlite://")
    Base.metadata.create_all(engine)
    factory = make_sessionmaker(engine)
    with factory.begin() as session:
        ensure_project(session, "default")
    try:
        yield factory
    finally:
        engine.dispose()


def add_job(
    session: Session,
    *,
    job_id: str | None = None,
    status: JobStatus = JobStatus.VALIDATING_FILES,
    config: dict[str, Any] | None = None,
) -> Job:
    """A job row of the default project, straight into the database."""
    job = Job(
        id=job_id or new_id("ftjob"), project_id="default", status=status.value, model="m",
        training_file="f", dataset_path="/nonexistent", dataset_sha256="", seed=0,
        config=config or {},
    )  # fmt: skip
    session.add(job)
    session.flush()
    return job
