"""MLflow holds copies, thinkforge's database holds the trust anchors: an alias moved or a
manifest tag deleted straight through ``MlflowClient`` is found, audited as
``external_change`` and put back, and neither a promotion nor a deployment ever reaches a
version whose files differ from what the database pinned. Real MLflow store, real HTTP."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.platform.conftest import Api
from tests.platform.test_api_deployments import model_app, serve_of
from tests.platform.test_api_files import assert_error
from tests.platform.test_registry_mlflow import NAME, stored_file
from thinkforge.platform.tracker import MirrorRefresher
from thinkforge.platform.trust import guard_registry

TAG = "manifest_sha256"


def _guard(api: Api) -> None:
    ctx = api.app.state.ctx  # type: ignore[attr-defined]
    guard_registry(ctx.sessions, ctx.registry())


def _external_changes(api: Api) -> list[dict]:
    audit = api.client.get("/v1/audit", params={"limit": 100}).json()["data"]
    return [a for a in audit if a["action"] == "external_change"]


def _aliases(mlflow: MlflowClient) -> dict[str, int]:
    return {k: int(v) for k, v in mlflow.get_registered_model(NAME).aliases.items()}


def _served(api: Api) -> str:
    return model_app(serve_of(api).configs[-1], "sums")["args"]["models"][0]["model_uri"]


def test_an_alias_moved_in_mlflow_is_audited_put_back_and_never_served(
    api: Api, versions: list[str]
) -> None:
    aliases = f"/v1/registry/models/{NAME}/aliases/production"
    assert api.client.put(aliases, json={"version": 1}).status_code == 200
    deployed = api.client.post(
        "/v1/deployments", json={"name": "sums", "model": f"{NAME}@production"}
    )
    assert deployed.status_code == 200, deployed.text
    mlflow = MlflowClient(api.settings.mlflow_tracking_uri)
    mlflow.set_registered_model_alias(NAME, "production", "3")  # around the admin check

    api.app.state.ctx.deployments().reconcile(force=True)  # type: ignore[attr-defined]
    assert _served(api) == f"models:/{NAME}/1", "a deployment followed an unaudited move"

    _guard(api)
    (change,) = _external_changes(api)
    assert (change["target"], change["from_value"], change["to_value"]) == (
        f"{NAME}@production", "1", "3",
    )  # fmt: skip
    assert _aliases(mlflow) == {"production": 1}
    _guard(api)
    assert len(_external_changes(api)) == 1, "a change is audited once"


def test_a_deleted_manifest_tag_pins_nothing_away(api: Api, versions: list[str]) -> None:
    ctx = api.app.state.ctx  # type: ignore[attr-defined]
    MirrorRefresher(ctx.sessions, ctx.registry)()  # the database pins what it first saw
    mlflow = MlflowClient(api.settings.mlflow_tracking_uri)
    pinned = mlflow.get_model_version(NAME, "2").tags[TAG]

    # The attack: new weights, a manifest that matches them, and no tag to contradict it.
    artifacts = Path(api.settings.mlflow_artifact_root)
    weights = stored_file(artifacts, "ftjob-2", "model.safetensors")
    weights.write_bytes(b"\0" + weights.read_bytes()[1:])
    manifest_path = stored_file(artifacts, "ftjob-2", "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["model.safetensors"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    mlflow.delete_model_version_tag(NAME, "2", TAG)

    promoted = api.client.put(f"/v1/registry/models/{NAME}/aliases/production", json={"version": 2})
    assert assert_error(promoted, 409, "version")["code"] == "integrity_check_failed"
    assert _aliases(mlflow) == {}

    deployed = api.client.post("/v1/deployments", json={"name": "sums", "model": f"{NAME}/1"})
    assert deployed.status_code == 200, deployed.text
    assert api.client.patch("/v1/deployments/sums", json={"model": f"{NAME}/2"}).status_code == 200
    assert _served(api) == f"models:/{NAME}/1", "a deployment rolled to files nobody pinned"

    _guard(api)
    (change,) = _external_changes(api)
    assert (change["target"], change["from_value"], change["to_value"]) == (
        f"{NAME}/2", pinned, None,
    )  # fmt: skip
    assert mlflow.get_model_version(NAME, "2").tags[TAG] == pinned
