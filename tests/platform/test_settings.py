"""Settings: derived defaults under the data dir, THINKFORGE_ variables, production checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from thinkforge.platform.settings import Settings

STRONG = "s" * 40


def test_defaults_live_under_the_data_dir(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    assert s.database_url == f"sqlite:///{tmp_path / 'thinkforge.db'}"
    assert s.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert s.storage_path == str(tmp_path / "checkpoints")
    assert s.dataset_roots == [tmp_path / "datasets"]
    assert s.serve_url == f"http://127.0.0.1:{s.serve_port}/v1"


def test_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("THINKFORGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("THINKFORGE_PORT", "9001")
    monkeypatch.setenv("THINKFORGE_DATASET_ROOTS", '["/data/a", "/data/b"]')
    s = Settings()
    assert s.port == 9001 and s.dataset_roots == [Path("/data/a"), Path("/data/b")]
    monkeypatch.setenv("THINKFORGE_PORT", "99999")
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({}, "THINKFORGE_SECRET_KEY"),
        ({"secret_key": "short"}, "at least 32"),
        ({"secret_key": STRONG, "bootstrap_api_key": "tf-short"}, "BOOTSTRAP_API_KEY"),
        ({"secret_key": STRONG}, "PostgreSQL"),
    ],
)
def test_production_refuses_default_secrets(tmp_path: Path, overrides: dict, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        Settings(env="production", data_dir=tmp_path, **overrides)


def test_production_starts_with_real_secrets(tmp_path: Path) -> None:
    s = Settings(
        env="production", data_dir=tmp_path, secret_key=STRONG, bootstrap_api_key=STRONG,  # type: ignore[arg-type]
        database_url="postgresql://thinkforge@db/thinkforge",
    )  # fmt: skip
    assert s.env == "production"


@pytest.mark.parametrize("env", ["development", "production"])
def test_browsable_api_pages_only_in_development(tmp_path: Path, env: str) -> None:
    from fastapi.testclient import TestClient

    from tests.platform.fakes import FakeLauncher
    from thinkforge.platform.app import create_app

    s = Settings(
        env=env, data_dir=tmp_path, secret_key=STRONG, bootstrap_api_key=STRONG,  # type: ignore[arg-type]
        database_url="postgresql+psycopg://thinkforge@db.invalid/thinkforge",
    )  # fmt: skip
    client = TestClient(create_app(s, launcher=FakeLauncher()))  # no lifespan: no database
    public = {"/docs": env == "development", "/redoc": env == "development", "/openapi.json": True}
    for path, served in public.items():
        assert (client.get(path).status_code == 200) is served, path
