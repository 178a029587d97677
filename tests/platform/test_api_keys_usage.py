"""Keys with roles and revocation, quotas, usage recorded in batches, /metrics (issue #14)."""

from __future__ import annotations

import time

import httpx
import pytest
from typer.testing import CliRunner

from tests.platform.conftest import BOOTSTRAP_KEY, Api
from thinkforge.cli import app as cli_app
from thinkforge.contract import frontdoor_token
from thinkforge.platform.auth import hash_key
from thinkforge.platform.models import ApiKey, Project, UsageRecord


def door(api: Api) -> httpx.Client:
    token = frontdoor_token(api.settings.secret_key.get_secret_value())
    return api.keyed(token)


def count(api: Api, model: type) -> int:
    with api.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
        return session.query(model).count()


def test_roles_list_and_revoke(api: Api) -> None:
    admin, member, app_key = (api.new_key("team", r) for r in ("admin", "member", "inference"))
    other = api.new_key("other", "admin")
    with api.keyed(admin) as a, api.keyed(member) as m, api.keyed(app_key) as i:
        listed = a.get("/v1/keys").json()["data"]
        assert sorted(k["role"] for k in listed) == ["admin", "inference", "member"]
        assert all("key_hash" not in k and k["revoked_at"] is None for k in listed)
        # Members may not manage keys; inference keys get nothing from the REST API.
        assert m.get("/v1/keys").status_code == 403
        assert m.get("/v1/deployments").status_code == 200
        resp = i.get("/v1/deployments")
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "inference_key"

        member_id = next(k["id"] for k in listed if k["role"] == "member")
        with api.keyed(other) as o:  # another project's admin: absent, and nothing changes
            assert o.post(f"/v1/keys/{member_id}/revoke").status_code == 404
        assert m.get("/v1/deployments").status_code == 200
        revoked = a.post(f"/v1/keys/{member_id}/revoke")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
        again = a.post(f"/v1/keys/{member_id}/revoke").json()
        assert again["revoked_at"] == revoked.json()["revoked_at"]  # idempotent
        assert m.get("/v1/deployments").status_code == 401
        assert a.post("/v1/keys/key-0123/revoke").status_code == 404


def test_quotas_default_and_per_project(api: Api) -> None:
    member = api.new_key("team", "member")
    q = api.client.get("/v1/quotas").json()
    assert q["default"] and q["requests_per_minute"] == api.settings.default_requests_per_minute
    with api.keyed(member) as m:
        assert m.patch("/v1/quotas", json={"requests_per_minute": 5}).status_code == 403
    bad = api.client.patch("/v1/quotas", json={"requests_per_minute": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "requests_per_minute"
    set_ = api.client.patch("/v1/quotas", json={"requests_per_minute": 5}).json()
    assert set_ == {
        "object": "quota", "requests_per_minute": 5, "default": False,
        "tokens_per_minute": api.settings.default_tokens_per_minute,
    }  # fmt: skip
    with api.keyed(member) as m:  # the other project keeps the default
        assert m.get("/v1/quotas").json()["default"]


def test_front_door_directory_and_usage_batches(api: Api) -> None:
    key = api.new_key("team", "inference")
    # The internal routes answer the front door's derived token only.
    assert api.client.get("/v1/internal/frontdoor").status_code == 401
    assert httpx.get(f"{api.url}/v1/internal/frontdoor").status_code == 401
    directory = door(api).get("/v1/internal/frontdoor").json()
    digest = hash_key(api.settings.secret_key.get_secret_value(), key)
    entry = next(k for k in directory["keys"] if k["digest"] == digest)
    assert (entry["project_id"], entry["role"]) == ("team", "inference")
    assert directory["default_quota"]["tokens_per_minute"] > 0

    now = int(time.time())
    day = 86400

    def rec(deployment: str, key_id: str, minute: int, n: int, p: int, c: int, r: int) -> dict:
        return {
            "project_id": "default", "key_id": key_id, "deployment": deployment,
            "model_version": "m/1", "minute": minute, "requests": n, "prompt_tokens": p,
            "completion_tokens": c, "reasoning_tokens": r,
        }  # fmt: skip

    batch = [
        rec("sums", "key-a", now, 3, 30, 60, 40),
        rec("sums", "key-b", now, 1, 10, 20, 5),
        rec("chat", "key-a", now - day, 2, 8, 8, 0),
        {**rec("sums", "key-a", now, 1, 1, 1, 1), "project_id": "gone"},  # dropped
    ]
    assert count(api, UsageRecord) == 0
    assert door(api).post("/v1/internal/usage", json={"records": batch}).json() == {"recorded": 3}
    bad = door(api).post("/v1/internal/usage", json={"records": [{**batch[0], "requests": -1}]})
    assert bad.status_code == 400 and count(api, UsageRecord) == 3

    by_dep = api.client.get("/v1/usage", params={"group_by": "deployment"}).json()
    assert [(b["group"], b["requests"], b["total_tokens"]) for b in by_dep["data"]] == [
        ("sums", 4, 120), ("chat", 2, 16),
    ]  # fmt: skip
    assert by_dep["data"][0]["reasoning_tokens"] == 45
    by_key = api.client.get("/v1/usage", params={"group_by": "key"}).json()["data"]
    assert {b["group"]: b["prompt_tokens"] for b in by_key} == {"key-a": 38, "key-b": 10}
    by_day = api.client.get("/v1/usage", params={"group_by": "day"}).json()["data"]
    assert [b["requests"] for b in by_day] == [2, 4]
    recent = api.client.get("/v1/usage", params={"start": now - 3600}).json()["data"]
    assert [b["group"] for b in recent] == ["sums"]
    with api.keyed(api.new_key("team", "member")) as m:
        assert m.get("/v1/usage").json()["data"] == []  # another project's usage is not shown
    bad = api.client.get("/v1/usage", params={"group_by": "model"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"
    assert api.client.get("/v1/usage", params={"start": 10, "end": 5}).status_code == 400
    # past datetime's last second (year 9999) a bound is a 400, not a 500 from fromtimestamp
    far = api.client.get("/v1/usage", params={"start": 0, "end": 2**40})
    assert far.status_code == 400 and far.json()["error"]["param"] == "end", far.text
    last = 253402300799  # 9999-12-31T23:59:59Z
    assert api.client.get("/v1/usage", params={"start": 0, "end": last}).status_code == 200


def test_metrics_has_request_histograms(api: Api) -> None:
    api.client.get("/v1/deployments")
    httpx.get(f"{api.url}/v1/deployments")  # a 401
    text = httpx.get(f"{api.url}/metrics").text
    assert (
        'thinkforge_api_requests_total{method="GET",route="/v1/deployments",status="200"}' in text
    )
    assert 'route="/v1/deployments",status="401"' in text
    assert "thinkforge_api_request_duration_seconds_bucket{" in text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cli_keys_and_usage(api: Api) -> None:
    env = {"THINKFORGE_API_URL": api.url, "THINKFORGE_API_KEY": BOOTSTRAP_KEY, "COLUMNS": "200"}
    runner = CliRunner()
    api.new_key("default", "inference")
    listed = runner.invoke(cli_app, ["keys", "list"], env=env)
    assert listed.exit_code == 0 and "inference" in listed.stdout
    with api.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
        key_id = session.query(ApiKey.id).filter(ApiKey.role == "inference").scalar()
        assert session.get(Project, "default") is not None
    revoked = runner.invoke(cli_app, ["keys", "revoke", key_id], env=env)
    assert revoked.exit_code == 0 and '"revoked_at"' in revoked.stdout
    shown = runner.invoke(cli_app, ["usage", "--group-by", "day"], env=env)
    assert shown.exit_code == 0 and "requests" in shown.stdout


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_front_door_parts_against_the_control_plane(api: Api) -> None:
    """The ingress's directory and usage batches, through the control plane's real routes:
    a key verifies, a revoked key leaves on the next pull, usage adds up."""
    import asyncio

    from thinkforge.serve.access import AccessOptions, DirectorySource, DirectoryUnavailable
    from thinkforge.serve.usage import UsageBuffer

    secret = api.settings.secret_key.get_secret_value()
    key = api.new_key("team", "inference")

    async def run() -> None:
        wrong = DirectorySource(AccessOptions(url=api.url, secret="not-the-secret"))
        with pytest.raises(DirectoryUnavailable):  # the derived token does not match
            await wrong.current()
        await wrong.http.aclose()

        source = DirectorySource(AccessOptions(url=api.url, secret=secret, refresh_s=0.2))
        directory = await source.current()
        caller = directory.caller(secret, key)
        assert caller is not None and caller.project_id == "team"
        assert directory.caller(secret, "tf-nope") is None
        assert directory.caller(secret, BOOTSTRAP_KEY).project_id == "default"  # type: ignore[union-attr]

        buffer = UsageBuffer(source.http)
        for _ in range(3):
            buffer.add(caller, "sums", "m/1", prompt=5, completion=7, reasoning=4)
        assert await buffer.flush() == 1  # three requests, one group, one insert
        assert await buffer.flush() == 0

        with api.keyed(api.new_key("team", "admin")) as admin:
            admin.post(f"/v1/keys/{caller.key_id}/revoke").raise_for_status()
            usage = admin.get("/v1/usage").json()["data"]
        assert [(u["group"], u["requests"], u["total_tokens"]) for u in usage] == [("sums", 3, 36)]
        await asyncio.sleep(0.3)
        assert (await source.current()).caller(secret, key) is None
        await source.http.aclose()

    asyncio.run(run())


def test_front_door_pulls_again_for_a_key_made_since_its_last_pull(api: Api) -> None:
    """A key used the moment it is made: the door's directory is asked again at once
    (rate-limited), not only at the next refresh, so a new evaluation's key works."""
    import asyncio

    from thinkforge.serve.access import AccessOptions, DirectorySource

    secret = api.settings.secret_key.get_secret_value()

    async def run() -> None:
        source = DirectorySource(AccessOptions(url=api.url, secret=secret, refresh_s=30))
        await source.current()
        key = api.new_key("team", "inference")
        assert (await source.current()).caller(secret, key) is None  # the 30 s refresh
        await asyncio.sleep(0.3)
        assert (await source.current(max_age_s=0.25)).caller(secret, key) is not None
        await source.http.aclose()

    asyncio.run(run())
