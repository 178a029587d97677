"""/readyz asks every part the control plane needs (database, Ray, MLflow) and names the
one that is down; 503 bodies never show the MLflow URI (it may carry credentials)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import LiveServer, free_port, seed_mlflow_store
from tests.platform.conftest import BOOTSTRAP_KEY, make_settings
from thinkforge.platform.app import create_app
from thinkforge.platform.mlflow_server import MlflowServer

SECRET_URI_PART = "s3cr3t-mlflow-password"


def test_readyz_names_mlflow_when_its_server_is_down_without_showing_its_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    uri = f"http://admin:{SECRET_URI_PART}@127.0.0.1:{free_port()}"
    settings = make_settings(
        tmp_path, f"sqlite:///{tmp_path / 'tf.db'}", ray_address=f"http://127.0.0.1:{free_port()}"
    )
    settings.mlflow_tracking_uri = uri
    with LiveServer(create_app(settings)) as server:
        resp = httpx.get(f"{server.url}/readyz", timeout=30)
        models = httpx.get(
            f"{server.url}/v1/registry/models",
            headers={"Authorization": f"Bearer {BOOTSTRAP_KEY}"},
            timeout=60,
        )
    assert resp.status_code == 503
    assert resp.json()["checks"]["mlflow"].startswith("error")
    assert "mlflow" in resp.json()["status"]
    # The registry's own 503 says MLflow failed, but not where it lives.
    assert models.status_code == 503, models.text
    assert models.json()["error"]["code"] == "registry_unavailable"
    for text in (resp.text, models.text):
        assert SECRET_URI_PART not in text and "127.0.0.1" not in text


def test_readyz_names_ray_then_mlflow_then_the_database(tmp_path: Path, pg_database: str) -> None:
    """Ray is not there; a real `mlflow server` stops; then the real PostgreSQL database
    is dropped. Each time /readyz names what is down."""
    mlflow_db = f"sqlite:///{seed_mlflow_store(tmp_path / 'mlflow-server.db')}"
    server = MlflowServer(mlflow_db, str(tmp_path / "mlartifacts"), port=free_port())
    settings = make_settings(tmp_path, pg_database, ray_address=f"http://127.0.0.1:{free_port()}")
    settings.mlflow_tracking_uri = server.url
    with server, LiveServer(create_app(settings)) as api:
        up = httpx.get(f"{api.url}/readyz", timeout=30)
        assert up.status_code == 503 and up.json()["status"] == "unavailable: ray"
        assert up.json()["checks"]["mlflow"] == "ok" and up.json()["checks"]["database"] == "ok"
        server.stop()
        down = httpx.get(f"{api.url}/readyz", timeout=30).json()
        assert down["checks"]["mlflow"].startswith("error")
        _drop(pg_database)
        gone = httpx.get(f"{api.url}/readyz", timeout=30)
    assert gone.status_code == 503
    assert gone.json()["checks"]["database"].startswith("error")
    assert gone.json()["status"] == "unavailable: database, ray, mlflow"


def _drop(url: str) -> None:
    base, name = url.rsplit("/", 1)
    admin = sa.create_engine(
        f"{base}/test".replace("postgresql://", "postgresql+psycopg://"),
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
