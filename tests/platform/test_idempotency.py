"""Idempotency-Key edges: a key whose first request still runs, and expired keys purged."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from tests.conftest import LiveServer
from tests.platform.conftest import BOOTSTRAP_KEY, Api, make_settings
from tests.platform.fakes import FakeLauncher, FakeServe
from tests.platform.test_api_files import assert_error
from tests.platform.test_registry_mlflow import NAME
from thinkforge.platform.app import create_app
from thinkforge.platform.idempotency import IN_FLIGHT_LEASE
from thinkforge.platform.models import IdempotencyKey, utcnow
from thinkforge.platform.registry import Page


def test_a_key_whose_first_request_still_runs_answers_409(api: Api, versions: list[str]) -> None:
    serve = api.app.state.ctx.serve  # type: ignore[attr-defined]
    serve.gate = threading.Event()
    body = {"name": "held", "model": f"{NAME}/1"}
    key = {"Idempotency-Key": "held-1"}
    with cf.ThreadPoolExecutor(max_workers=1) as pool, api.keyed(BOOTSTRAP_KEY) as other:
        first = pool.submit(api.client.post, "/v1/deployments", json=body, headers=key)
        try:
            assert serve.entered.wait(30), "the first request never reached Serve"
            held = other.post("/v1/deployments", json=body, headers=key)
            assert assert_error(held, 409, "Idempotency-Key")["code"] == "idempotency_in_flight"
        finally:
            serve.gate.set()
        assert first.result().status_code == 200, first.result().text
    replay = api.client.post("/v1/deployments", json=body, headers=key)
    assert replay.status_code == 200 and replay.json() == first.result().json()
    assert len(serve.configs) == 1, "the held retry must not apply a second time"


class _EmptyRegistry:
    def list_models(self, **_: object) -> Page:
        return Page(items=[])


def _keys(sessions) -> set[str]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return set(session.scalars(select(IdempotencyKey.key)))


def test_expired_keys_are_purged_by_the_reconciler(tmp_path: Path, database_url: str) -> None:
    ttl_s = 3600
    settings = make_settings(
        tmp_path, database_url, start_reconciler=True, reconcile_interval_s=0.1,
        idempotency_ttl_s=ttl_s, idempotency_purge_interval_s=0.1,
    )  # fmt: skip
    app = create_app(settings, launcher=FakeLauncher(), serve=FakeServe())
    app.state.ctx.registry_factory = _EmptyRegistry  # the loop's mirror pass needs no MLflow
    sessions = app.state.ctx.sessions
    with LiveServer(app):
        now = utcnow()
        ages = {
            "done-expired": ("done", timedelta(seconds=ttl_s + 60)),
            "done-fresh": ("done", timedelta(seconds=ttl_s - 60)),
            "held-past-lease": ("in_flight", IN_FLIGHT_LEASE + timedelta(seconds=60)),
            "held-in-lease": ("in_flight", IN_FLIGHT_LEASE - timedelta(seconds=60)),
        }
        with sessions.begin() as session:
            for key, (state, age) in ages.items():
                session.add(
                    IdempotencyKey(
                        project_id="default", key=key, method="POST", path="/v1/files",
                        fingerprint="0" * 64, state=state, created_at=now - age,
                        response_status=200 if state == "done" else None,
                        response_body={} if state == "done" else None,
                    )
                )  # fmt: skip
        deadline = time.monotonic() + 30
        while _keys(sessions) != {"done-fresh", "held-in-lease"}:
            assert time.monotonic() < deadline, f"not purged: {_keys(sessions)}"
            time.sleep(0.1)
