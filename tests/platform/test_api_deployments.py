"""Deployments API with a fake Serve (unit level): desired config, validation, rollouts on
promotion. The real Ray Serve path is covered in tests/integration/test_serving_e2e.py."""

from __future__ import annotations

import concurrent.futures as cf
import time
from pathlib import Path

import httpx
import pytest

from tests.platform.conftest import BOOTSTRAP_KEY, Api
from tests.platform.test_api_files import assert_error
from tests.platform.test_registry_mlflow import NAME


def serve_of(api: Api):  # type: ignore[no-untyped-def]
    return api.app.state.ctx.serve  # type: ignore[attr-defined]


# vLLM's CPU build serves on device 'cpu'; elsewhere the vllm engine needs num_gpus.
VLLM = {"name": "x", "model": f"{NAME}/1", "engine": "vllm", "device": "cpu"}


def model_app(config: dict, name: str) -> dict:
    (app,) = [a for a in config["applications"] if a["name"] == f"model-{name}"]
    return app


def test_create_follow_alias_roll_and_delete(api: Api, versions: list[str], tmp_path: Path) -> None:
    api.settings.frontdoor_refresh_s = 2  # a deleted deployment leaves Serve after 2 pulls
    put = api.client.put(f"/v1/registry/models/{NAME}/aliases/production", json={"version": 1})
    assert put.status_code == 200
    resp = api.client.post(
        "/v1/deployments",
        json={"name": "sums", "model": f"{NAME}@production", "max_queued_requests": 4,
              "autoscaling": {"min_replicas": 1, "max_replicas": 2}, "default_thinking": {"max_tokens": 64}},
    )  # fmt: skip
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "running" and body["served_version"] == f"{NAME}/1"
    config = serve_of(api).configs[-1]
    door = config["applications"][0]
    # The door names no deployment (it pulls them with the keys): it never rolls for one.
    assert door["name"] == "thinkforge" and "routes" not in door["args"]
    assert door["args"]["access"]["url"] == api.settings.internal_api_url
    assert body["public"] is False
    model = model_app(config, "sums")["args"]["models"][0]
    assert model["model_uri"] == f"models:/{NAME}/1" and model["max_queued_requests"] == 4
    assert model["autoscaling"]["max_replicas"] == 2
    assert (
        api.client.put(
            f"/v1/registry/models/{NAME}/aliases/production", json={"version": 2}
        ).status_code
        == 200
    )
    rolled = serve_of(api).configs[-1]
    assert model_app(rolled, "sums")["args"]["models"][0]["model_uri"] == f"models:/{NAME}/2"
    assert api.client.get("/v1/deployments/sums").json()["served_version"] == f"{NAME}/2"
    ids = [m["id"] for m in api.client.get("/v1/models").json()["data"]]
    assert ids[0] == "sums" and {f"{NAME}/1", f"{NAME}/2", f"{NAME}/3"} <= set(ids)
    pinned = api.client.patch("/v1/deployments/sums", json={"model": f"{NAME}/3"})
    assert pinned.status_code == 200 and pinned.json()["served_version"] == f"{NAME}/3"
    public = api.client.patch("/v1/deployments/sums", json={"public": True}).json()
    assert public["public"] is True and public["config"] == pinned.json()["config"]
    assert serve_of(api).configs[-1]["applications"][0]["args"] == door["args"]
    gone = api.client.delete("/v1/deployments/sums")
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    # Out of the door's directory at once; out of Serve once every door has pulled again.
    assert api.client.get("/v1/deployments/sums").json()["status"] == "deleting"
    assert model_app(serve_of(api).configs[-1], "sums")
    time.sleep(4.5)
    api.app.state.ctx.deployments().reconcile()  # type: ignore[attr-defined]
    last = serve_of(api).configs[-1]
    assert [a["name"] for a in last["applications"]] == ["thinkforge"]
    assert last["applications"][0]["args"] == door["args"]
    assert_error(api.client.get("/v1/deployments/sums"), 404)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"name": "x", "model": "nope@production"}, 404, None),
        ({"name": "x", "model": f"{NAME}/9"}, 404, None),
        ({"name": "x", "model": "bad ref!"}, 400, "model"),
        ({"name": "bad name!", "model": f"{NAME}/1"}, 400, "name"),
        (
            {"name": "x", "model": f"{NAME}/1", "max_ongoing_requests": 0},
            400,
            "max_ongoing_requests",
        ),
        ({"name": "x", "model": f"{NAME}/1", "default_thinking": {"max_tokens": -1}}, 400, None),
        ({"name": "x", "model": f"{NAME}/1", "autoscaling": {"bogus": 1}}, 400, None),
        # engine_args: an allow-list, each value checked, the offending key named
        (VLLM | {"engine_args": {"swap_space": 4}}, 400, "engine_args.swap_space"),
        (
            VLLM | {"engine_args": {"tensor_parallel_size": 0}},
            400,
            "engine_args.tensor_parallel_size",
        ),
        (
            VLLM | {"engine_args": {"gpu_memory_utilization": 1.5}},
            400,
            "engine_args.gpu_memory_utilization",
        ),
        (VLLM | {"engine_args": {"max_model_len": 0}}, 400, "engine_args.max_model_len"),
        (VLLM | {"engine_args": {"max_num_seqs": "many"}}, 400, "engine_args.max_num_seqs"),
        (
            VLLM | {"engine_args": {"enable_prefix_caching": "sometimes"}},
            400,
            "engine_args.enable_prefix_caching",
        ),
        (VLLM | {"engine_args": {"dtype": "float8"}}, 400, "engine_args.dtype"),
        (VLLM | {"engine_args": {"kv_cache_dtype": "int3"}}, 400, "engine_args.kv_cache_dtype"),
        (VLLM | {"engine_args": {"quantization": "magic"}}, 400, "engine_args.quantization"),
        (VLLM | {"engine_args": []}, 400, "engine_args"),
        ({"name": "x", "model": f"{NAME}/1", "engine_args": {"max_num_seqs": 4}}, 400, None),
        ({**VLLM, "device": "auto"}, 400, None),  # the GPU build needs num_gpus
        (VLLM | {"engine_args": {"tensor_parallel_size": 2}}, 400, None),  # on cpu
        (
            VLLM | {"device": "cuda", "num_gpus": 1, "engine_args": {"tensor_parallel_size": 2}},
            400,
            None,
        ),
    ],
)
def test_bad_deployments_write_nothing(
    api: Api, versions: list[str], body: dict, status: int, param: str | None
) -> None:
    error = assert_error(api.client.post("/v1/deployments", json=body), status, param)
    if "engine_args" in body or body.get("engine") == "vllm":
        named = param or ("engine_args" if "engine_args" in body else "num_gpus")
        assert named in error["message"]
    assert api.client.get("/v1/deployments").json()["data"] == []
    assert serve_of(api).configs == []


def test_vllm_engine_args_reach_serve_and_tensor_parallel_reserves_gpus(
    api: Api, versions: list[str]
) -> None:
    from thinkforge.serve.app import ServedModel

    args = {"tensor_parallel_size": 4, "max_model_len": 8192, "enable_prefix_caching": True}
    body = {"name": "tp", "model": f"{NAME}/1", "engine": "vllm", "device": "cuda"}
    made = api.client.post("/v1/deployments", json=body | {"engine_args": args})
    assert made.status_code == 200, made.text
    assert made.json()["engine"] == "vllm"
    model = model_app(serve_of(api).configs[-1], "tp")["args"]["models"][0]
    assert {k: v for k, v in model["engine_args"].items() if v is not None} == args
    served = ServedModel.model_validate(model)
    assert served.engine_args is not None
    assert served.engine_args.vllm_kwargs() == args | {"distributed_executor_backend": "ray"}
    options = served.deployment_options()
    assert (
        options["placement_group_bundles"]
        == [{"CPU": model["num_cpus"]}] + [{"GPU": 1, "CPU": 1}] * 4
    )
    assert options["placement_group_strategy"] == "PACK"
    assert options["ray_actor_options"]["num_gpus"] == 0  # the workers hold the GPUs
    one = ServedModel.model_validate(model | {"num_gpus": 1, "engine_args": {"max_num_seqs": 2}})
    assert "placement_group_bundles" not in one.deployment_options()


def test_duplicate_name_conflicts(api: Api, versions: list[str]) -> None:
    body = {"name": "dup", "model": f"{NAME}/1"}
    assert api.client.post("/v1/deployments", json=body).status_code == 200
    assert_error(api.client.post("/v1/deployments", json=body), 409, "name")
    assert len(api.client.get("/v1/deployments").json()["data"]) == 1


def test_create_with_an_idempotency_key_replays_the_first_answer(
    api: Api, versions: list[str]
) -> None:
    body = {"name": "once", "model": f"{NAME}/1"}
    key = {"Idempotency-Key": "deploy-once"}
    first = api.client.post("/v1/deployments", json=body, headers=key)
    again = api.client.post("/v1/deployments", json=body, headers=key)
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    assert len(serve_of(api).configs) == 1  # applied once
    other = api.client.post("/v1/deployments", json={**body, "model": f"{NAME}/2"}, headers=key)
    assert_error(other, 422, "Idempotency-Key")
    assert [d["name"] for d in api.client.get("/v1/deployments").json()["data"]] == ["once"]


def test_concurrent_creates_of_one_name_across_projects_make_one(
    api: Api, versions: list[str]
) -> None:
    """Names are global (clients send them to one front door), so two projects racing for
    one name get one deployment and a 409, never a 500 or two rows."""
    keys = [BOOTSTRAP_KEY, api.new_key("other", role="admin")] * 5

    def post(key: str) -> httpx.Response:
        with api.keyed(key) as client:
            return client.post("/v1/deployments", json={"name": "race", "model": f"{NAME}/1"})

    with cf.ThreadPoolExecutor(max_workers=len(keys)) as pool:
        responses = list(pool.map(post, keys))
    assert sorted(r.status_code for r in responses) == [200] + [409] * 9
    for r in responses:
        if r.status_code == 409:
            assert_error(r, 409, "name")
    owners = [k for k, r in zip(keys, responses, strict=True) if r.status_code == 200]
    for key in set(keys):
        with api.keyed(key) as client:
            listed = client.get("/v1/deployments").json()["data"]
        assert [d["name"] for d in listed] == (["race"] if key in owners else [])


def test_lora_adapters_are_adapter_versions_pinned_and_never_on_vllm(
    api: Api, versions: list[str]
) -> None:
    """``adapters`` name LoRA adapter versions (tag lora=adapter), pinned like the model;
    the vllm engine serves no adapter: 400 at deploy time, nothing written."""
    from mlflow.tracking import MlflowClient

    from thinkforge.contract import LORA_TAG

    MlflowClient(api.settings.mlflow_tracking_uri).set_model_version_tag(
        NAME, "3", LORA_TAG, "adapter"
    )
    body = {"name": "lora", "model": f"{NAME}/1"}
    refused = [
        ({**body, "adapters": {"a": f"{NAME}/2"}}, 400, "adapters.a"),  # a full model
        ({**body, "adapters": {"a": f"{NAME}/9"}}, 404, "adapters.a"),
        ({**body, "adapters": {"a b": f"{NAME}/3"}}, 400, None),
        ({**VLLM, "model": f"{NAME}/3"}, 400, "engine"),  # an adapter version on vllm
        ({**VLLM, "adapters": {"a": f"{NAME}/3"}}, 400, None),
    ]
    for i, (request, status, param) in enumerate(refused):
        error = assert_error(api.client.post("/v1/deployments", json=request), status, param)
        if i >= 3:
            assert "transformers engine only" in error["message"]
    assert api.client.get("/v1/deployments").json()["data"] == []
    made = api.client.post("/v1/deployments", json={**body, "adapters": {"a": f"{NAME}@canary"}})
    assert made.status_code == 404  # no such alias yet
    put = api.client.put(f"/v1/registry/models/{NAME}/aliases/canary", json={"version": 3})
    assert put.status_code == 200
    made = api.client.post("/v1/deployments", json={**body, "adapters": {"a": f"{NAME}@canary"}})
    assert made.status_code == 200, made.text
    assert made.json()["config"]["adapters"] == {"a": f"{NAME}@canary"}
    model = model_app(serve_of(api).configs[-1], "lora")["args"]["models"][0]
    assert model["adapters"] == {"a": f"models:/{NAME}/3"}
