"""schemathesis against /openapi.json over real HTTP: generated input never causes a 5xx."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.platform.conftest import BOOTSTRAP_KEY, Api
from tests.platform.data import S1K, jsonl
from tests.platform.test_api_files import upload


def test_no_server_errors_on_generated_input(api: Api) -> None:
    upload(api, jsonl(S1K))  # so that some generated ids and cursors hit real rows' tables
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    headers = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=30,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            resp = case.call(base_url=api.url, headers=headers, timeout=60)
            assert resp.status_code < 500, (case.method, case.path, resp.text)
            if resp.status_code >= 400:
                assert set(resp.json()["error"]) == {"message", "type", "param", "code"}

        check()
        checked.append(f"{operation.method.upper()} {operation.path}")
    assert "POST /v1/fine_tuning/jobs" in checked and "POST /v1/files" in checked
