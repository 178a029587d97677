"""A registered model belongs to the project whose job claimed its name: another project's
key finds nothing there (404, as for a missing model), cannot deploy or train on it, and
cannot claim the name; names nobody claimed stay shared. Real HTTP, SQLite and PostgreSQL."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from tests.platform.conftest import BOOTSTRAP_KEY, Api
from tests.platform.data import S1K, jsonl
from tests.platform.test_api_deployments import serve_of
from tests.platform.test_api_files import assert_error, upload
from tests.platform.test_registry_mlflow import NAME, register_job
from thinkforge.platform.models import Job, RegisteredModelOwner

OWNED = "owned-sft"


def new_file(api: Api, key: str = BOOTSTRAP_KEY) -> str:
    resp = upload(api, jsonl(S1K, S1K), headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


def post_job(client: httpx.Client, file_id: str, **fields: object) -> httpx.Response:
    body = {"model": "thinkforge/tiny", "training_file": file_id, **fields}
    return client.post("/v1/fine_tuning/jobs", json=body)


def claims(api: Api) -> dict[str, str]:
    with api.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
        rows = session.execute(select(RegisteredModelOwner.name, RegisteredModelOwner.project_id))
        return {name: project for name, project in rows}


def jobs_of(api: Api, project_id: str) -> list[Job]:
    with api.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
        return list(session.scalars(select(Job).where(Job.project_id == project_id)))


@pytest.fixture
def owned(api: Api, tmp_path: Path) -> str:
    """Version 1 of OWNED, registered by a job of the default project (which claimed it)."""
    job = post_job(api.client, new_file(api), suffix=OWNED)
    assert job.status_code == 200, job.text
    uri, root = api.settings.mlflow_tracking_uri, api.settings.mlflow_artifact_root
    return register_job(uri, tmp_path, job.json()["id"], artifact_root=root, name=OWNED)


@pytest.fixture
def other(api: Api) -> str:
    return api.new_key("other", role="admin")


def test_another_projects_model_answers_like_a_missing_one(
    api: Api, versions: list[str], owned: str, other: str
) -> None:
    assert owned == f"{OWNED}/1"
    base = f"/v1/registry/models/{OWNED}"
    assert api.client.put(f"{base}/aliases/production", json={"version": 1}).status_code == 200
    with api.keyed(other) as b:
        missing = assert_error(b.get("/v1/registry/models/nope"), 404, "model")
        hidden = assert_error(b.get(base), 404, "model")
        assert hidden == {**missing, "message": missing["message"].replace("'nope'", f"'{OWNED}'")}
        assert_error(b.get(f"{base}/versions"), 404, "model")
        assert_error(b.get(f"{base}/versions/1"), 404, "model")
        assert_error(b.put(f"{base}/aliases/production", json={"version": 1}), 404, "model")
        assert_error(b.put(f"{base}/aliases/staging", json={"version": 1}), 404, "model")
        assert_error(b.post(f"{base}/aliases/production/rollback"), 404, "model")
        assert_error(b.delete(f"{base}/aliases/production"), 404, "model")
        assert [m["name"] for m in b.get("/v1/registry/models").json()["data"]] == [NAME]
        servable = {m["id"] for m in b.get("/v1/models").json()["data"]}
        assert servable == {f"{NAME}/1", f"{NAME}/2", f"{NAME}/3"}
        # A name nobody claimed (registered straight into MLflow) is shared, aliases included.
        assert b.get(f"/v1/registry/models/{NAME}/versions/2").status_code == 200
        shared = b.put(f"/v1/registry/models/{NAME}/aliases/production", json={"version": 2})
        assert shared.status_code == 200, shared.text
    mine = api.client.get(base).json()
    assert mine["aliases"] == {"production": 1}, "the other project moved nothing"
    listed = api.client.get("/v1/registry/models").json()["data"]
    assert sorted(m["name"] for m in listed) == sorted([NAME, OWNED])
    assert api.client.get(f"{base}/versions/1").json()["lineage"]["job_id"].startswith("ftjob-")
    assert api.client.get(f"/v1/registry/models/{NAME}").json()["aliases"] == {"production": 2}
    gone = api.client.delete(f"{base}/aliases/production")
    assert gone.status_code == 200 and api.client.get(base).json()["aliases"] == {}


def test_another_projects_model_cannot_be_deployed_or_trained_on(
    api: Api, versions: list[str], owned: str, other: str
) -> None:
    promoted = api.client.put(
        f"/v1/registry/models/{OWNED}/aliases/production", json={"version": 1}
    )
    assert promoted.status_code == 200, promoted.text
    file_b = new_file(api, other)
    with api.keyed(other) as b:
        for model in (f"{OWNED}/1", f"{OWNED}@production", f"models:/{OWNED}/1"):
            stolen = b.post("/v1/deployments", json={"name": "stolen", "model": model})
            assert_error(stolen, 404, "model")
        assert b.get("/v1/deployments").json()["data"] == [] and serve_of(api).configs == []
        made = b.post("/v1/deployments", json={"name": "shared", "model": f"{NAME}/1"})
        assert made.status_code == 200, made.text
        assert_error(b.patch("/v1/deployments/shared", json={"model": f"{OWNED}/1"}), 404, "model")
        assert b.get("/v1/deployments/shared").json()["model"] == f"{NAME}/1"
        for base in (f"models:/{OWNED}/1", f"models:/{OWNED}@production"):
            assert_error(post_job(b, file_b, model=base, suffix="mine"), 404, "model")
        taken = assert_error(post_job(b, file_b, suffix=OWNED), 409, "suffix")
        assert taken["code"] == "model_name_taken" and "another project" in taken["message"]
        assert jobs_of(api, "other") == [] and claims(api) == {OWNED: "default"}
        assert b.get("/v1/fine_tuning/jobs").json()["data"] == []
        # A shared model's name is no project's to take: that would hide it from the rest.
        shared = assert_error(post_job(b, file_b, suffix=NAME), 409, "suffix")
        assert shared["code"] == "model_name_taken" and "shared" in shared["message"]
        assert jobs_of(api, "other") == [] and NAME not in claims(api)
        # A shared base model is fine, and the job's own name becomes the other project's.
        ok = post_job(b, file_b, model=f"models:/{NAME}/1", suffix="mine")
        assert ok.status_code == 200, ok.text
    assert claims(api) == {OWNED: "default", "mine": "other"}
    assert_error(post_job(api.client, new_file(api), suffix="mine"), 409, "suffix")
    again = post_job(api.client, new_file(api), suffix=OWNED)
    assert again.status_code == 200, "claiming a name the project owns is a no-op"
    assert len(jobs_of(api, "default")) == 2 and len(claims(api)) == 2


def test_a_job_without_suffix_claims_the_name_derived_from_its_base_model(
    api: Api, other: str
) -> None:
    assert post_job(api.client, new_file(api)).status_code == 200
    assert claims(api) == {"thinkforge-tiny-sft": "default"}
    with api.keyed(other) as b:
        assert_error(post_job(b, new_file(api, other)), 409, "suffix")
    too_long = post_job(api.client, new_file(api), model=f"models:/{'x' * 300}/1")
    assert_error(too_long, 400, "suffix")


def test_concurrent_claims_of_one_name_from_two_projects(api: Api, other: str) -> None:
    files = {BOOTSTRAP_KEY: new_file(api), other: new_file(api, other)}
    keys = [BOOTSTRAP_KEY, other] * 5

    def post(key: str) -> httpx.Response:
        with api.keyed(key) as client:
            return post_job(client, files[key], suffix="race")

    with cf.ThreadPoolExecutor(max_workers=len(keys)) as pool:
        responses = list(pool.map(post, keys))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 409} and 200 in codes, codes
    winners = {k for k, r in zip(keys, responses, strict=True) if r.status_code == 200}
    assert len(winners) == 1, "only one project's jobs got the name"
    for r in responses:
        if r.status_code == 409:
            assert assert_error(r, 409, "suffix")["code"] == "model_name_taken"
    owner = "default" if winners == {BOOTSTRAP_KEY} else "other"
    loser = "other" if owner == "default" else "default"
    assert claims(api) == {"race": owner}
    assert len(jobs_of(api, owner)) == 5 and jobs_of(api, loser) == []
