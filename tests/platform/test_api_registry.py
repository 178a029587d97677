"""Registry API over real HTTP, a real MLflow store, SQLite and PostgreSQL: lineage,
promotion with integrity checks, rollback, concurrent promotions and the audit log."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.platform.conftest import BOOTSTRAP_KEY, Api
from tests.platform.test_api_files import assert_error
from tests.platform.test_registry_mlflow import NAME, stored_file


def audit(api: Api) -> list[dict]:
    rows = api.client.get("/v1/audit", params={"target": f"{NAME}@production"}).json()["data"]
    return list(reversed(rows))  # oldest first


def alias(api: Api) -> int | None:
    return api.client.get(f"/v1/registry/models/{NAME}").json()["aliases"].get("production")


def promote(api: Api, version: int, reason: str = "") -> httpx.Response:
    return api.client.put(
        f"/v1/registry/models/{NAME}/aliases/production",
        json={"version": version, "reason": reason or None},
    )


def test_versions_with_lineage(api: Api, versions: list[str]) -> None:
    assert versions == [f"{NAME}/1", f"{NAME}/2", f"{NAME}/3"]
    models = api.client.get("/v1/registry/models").json()
    assert [m["name"] for m in models["data"]] == [NAME]
    listed = api.client.get(f"/v1/registry/models/{NAME}/versions", params={"limit": 2}).json()
    assert [v["version"] for v in listed["data"]] == [3, 2] and listed["has_more"]
    rest = api.client.get(f"/v1/registry/models/{NAME}/versions", params={"after": 2}).json()
    assert [v["version"] for v in rest["data"]] == [1] and not rest["has_more"]
    v2 = api.client.get(f"/v1/registry/models/{NAME}/versions/2").json()
    assert v2["status"] == "READY" and v2["lineage"]["job_id"] == "ftjob-2"
    assert (
        v2["lineage"]["base_model"] == "thinkforge/tiny" and v2["lineage"]["recipe"] == "tiny-cpu"
    )
    assert v2["lineage"]["dataset_sha256"] == "d" * 64
    assert v2["metrics"]["loss"] == 0.5 and "model.safetensors" in v2["manifest"]
    assert_error(api.client.get(f"/v1/registry/models/{NAME}/versions/9"), 404)
    assert_error(api.client.get("/v1/registry/models/nope"), 404)
    with httpx.Client(base_url=api.url) as anon:
        assert_error(anon.get("/v1/registry/models"), 401)


def test_promote_and_rollback_with_audit(api: Api, versions: list[str]) -> None:
    first = promote(api, 1, "first release")
    assert first.status_code == 200, first.text
    assert first.json()["previous_version"] is None and alias(api) == 1
    assert promote(api, 3).json()["previous_version"] == 1 and alias(api) == 3
    back = api.client.post(
        f"/v1/registry/models/{NAME}/aliases/production/rollback", json={"reason": "regression"}
    )
    assert back.status_code == 200, back.text
    assert back.json()["version"] == 1 and back.json()["previous_version"] == 3 and alias(api) == 1
    rows = audit(api)
    assert [(r["action"], r["from_value"], r["to_value"]) for r in rows] == [
        ("promote", None, "1"), ("promote", "1", "3"), ("rollback", "3", "1"),
    ]  # fmt: skip
    assert rows[0]["reason"] == "first release" and rows[2]["reason"] == "regression"
    assert all(r["actor"] == "default/key-bootstrap" for r in rows)
    nothing_before = api.client.post(f"/v1/registry/models/{NAME}/aliases/production/rollback")
    assert_error(nothing_before, 409, "alias")
    deleted = api.client.delete(f"/v1/registry/models/{NAME}/aliases/production")
    assert deleted.status_code == 200 and alias(api) is None
    assert audit(api)[-1]["action"] == "delete" and audit(api)[-1]["from_value"] == "1"
    assert_error(api.client.delete(f"/v1/registry/models/{NAME}/aliases/production"), 404)


def test_a_retried_rollback_moves_the_alias_once(api: Api, versions: list[str]) -> None:
    for version in (1, 2, 3):
        assert promote(api, version).status_code == 200
    url = f"/v1/registry/models/{NAME}/aliases/production/rollback"
    key = {"Idempotency-Key": "undo-3"}
    first = api.client.post(url, json={"reason": "bad"}, headers=key)
    again = api.client.post(url, json={"reason": "bad"}, headers=key)
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    assert first.json()["version"] == 2 and alias(api) == 2  # not walked back to 1
    assert [r["action"] for r in audit(api)].count("rollback") == 1
    assert_error(api.client.post(url, json={"reason": "other"}, headers=key), 422)
    failed = api.client.post(url.replace("production", "nowhere"), headers={"Idempotency-Key": "k"})
    assert_error(failed, 409)
    retry = api.client.post(url, headers={"Idempotency-Key": "k"})  # a failure keeps no key
    assert retry.status_code == 200 and alias(api) == 1


@pytest.mark.parametrize("damage", ["corrupt", "delete"])
def test_damaged_version_is_not_promoted(api: Api, versions: list[str], damage: str) -> None:
    assert promote(api, 1).status_code == 200
    victim = stored_file(Path(api.settings.mlflow_artifact_root), "ftjob-2", "model.safetensors")
    if damage == "corrupt":
        data = bytearray(victim.read_bytes())
        data[0] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    err = assert_error(promote(api, 2), 409, "version")
    assert err["code"] == "integrity_check_failed" and "model.safetensors" in err["message"]
    assert alias(api) == 1
    assert [r["to_value"] for r in audit(api)] == ["1"]
    assert_error(promote(api, 7), 404)
    assert_error(
        api.client.put(f"/v1/registry/models/{NAME}/aliases/production", json={"version": 0}), 400
    )


def test_concurrent_promotions_of_one_alias(api: Api, versions: list[str]) -> None:
    assert promote(api, 1).status_code == 200

    def move(version: int) -> httpx.Response:
        with api.keyed(BOOTSTRAP_KEY) as client:
            return client.put(
                f"/v1/registry/models/{NAME}/aliases/production", json={"version": version}
            )

    seen: set[int | None] = set()
    with cf.ThreadPoolExecutor(4) as pool:
        moves = [pool.submit(move, 2), pool.submit(move, 3)]
        while not all(m.done() for m in moves):
            seen.add(alias(api))  # readers never see anything but the old or a new holder
        responses = [m.result() for m in moves]
    assert [r.status_code for r in responses] == [200, 200]
    assert seen <= {1, 2, 3}
    final = alias(api)
    assert final in (2, 3)
    rows = audit(api)
    chain = [(r["from_value"], r["to_value"]) for r in rows]
    assert chain[0] == (None, "1") and len(chain) == 3
    # Each move starts where the one before it ended: the two ran one after the other.
    assert chain[1][0] == "1" and chain[2][0] == chain[1][1] and chain[2][1] == str(final)


def test_the_reconciler_mirrors_versions_registered_outside_jobs(
    api: Api, versions: list[str]
) -> None:
    """The three versions were registered straight into MLflow: no job mirrored them."""
    from sqlalchemy import select

    from thinkforge.platform.models import ModelVersion
    from thinkforge.platform.tracker import MirrorRefresher

    ctx = api.app.state.ctx  # type: ignore[attr-defined]
    reads: list[tuple[str, int]] = []

    class Counting:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def get_version(self, name: str, version: int) -> Any:
            reads.append((name, version))
            return self.inner.get_version(name, version)

    registry = Counting(ctx.registry())
    refresh = MirrorRefresher(ctx.sessions, lambda: registry, every_s=0)
    refresh()
    with ctx.sessions() as session:
        rows = session.scalars(select(ModelVersion).order_by(ModelVersion.version)).all()
        mirrored = [(r.name, r.version, r.job_id, r.status, r.recipe) for r in rows]
        assert all(r.manifest and "config.json" in r.manifest for r in rows)
    assert mirrored == [(NAME, v, f"ftjob-{v}", "READY", "tiny-cpu") for v in (1, 2, 3)]
    assert sorted(reads) == [(NAME, 1), (NAME, 2), (NAME, 3)]
    refresh()  # nothing changed in MLflow: nothing is read again
    assert len(reads) == 3
    later = MirrorRefresher(ctx.sessions, lambda: registry, every_s=3600)
    later()
    later()  # the first pass lists (nothing new); the second, within its interval, skips
    assert len(reads) == 3
