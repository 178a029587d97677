"""The app's start and stop: what it owns is released even when the start fails."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import sqlalchemy.exc

from tests.conftest import free_port
from tests.platform.fakes import FakeLauncher, FakeServe
from thinkforge.platform import app as app_module
from thinkforge.platform.settings import Settings


class RecordingCluster:
    """Stands in for the local Ray head the app would own."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def start_in_background(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")

    def check(self) -> None:
        pass


def test_a_failed_start_stops_the_ray_head_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = RecordingCluster()
    monkeypatch.setattr(
        app_module, "ray_launcher_for", lambda _: (FakeLauncher(), FakeServe(), cluster)
    )
    down = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"  # nobody listens
    app = app_module.create_app(Settings(data_dir=tmp_path, database_url=down))

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pytest.fail("the app started without its database")

    with pytest.raises(sqlalchemy.exc.OperationalError):
        asyncio.run(start())
    assert cluster.calls == ["start", "stop"]
    assert app.state.ready is False
