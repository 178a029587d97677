"""The inference front door in production shape (issue #14), against real Ray Serve, the
control plane as a process, real Redis and real HTTP clients; one Serve for the module.

Keys (401 without, 200 with, 404 for another project's deployment, revoked keys stop),
public deployments, quotas (429 with the headers), usage that adds up, /metrics, a client
that drops a stream freeing its slot, a stream that survives a rollout and another
deployment's creation, and a deployment that autoscales out and back.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import seed_mlflow_store
from tests.integration.conftest import API_KEY, ControlPlane
from tests.integration.test_serving_e2e import register
from thinkforge.jobs.tiny import ensure_tiny_model
from thinkforge.platform.ray_cluster import LocalRayCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.redis]
NAME = "tiny"
REFRESH_S = 1.0
# A stream long enough to overlap a rollout: thinking is held open for 3000 tokens.
LONG = {"max_completion_tokens": 3500, "thinking": {"min_tokens": 3000, "max_tokens": 3000}}


class Door:
    """The Serve front door and the control plane of one module."""

    def __init__(self, plane: ControlPlane, serve_url: str, cluster: LocalRayCluster) -> None:
        self.plane, self.url, self.cluster = plane, serve_url, cluster

    def api(self, key: str = API_KEY) -> httpx.Client:
        return httpx.Client(
            base_url=self.plane.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )

    def chat(self, key: str | None, model: str = NAME, **extra: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        body = {"model": model, "messages": [{"role": "user", "content": "Sum: 1 2"}],
                "max_completion_tokens": 24, "thinking": {"max_tokens": 8}, **extra}  # fmt: skip
        return httpx.post(
            f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=180
        )

    def models(self, key: str) -> list[str]:
        resp = httpx.get(
            f"{self.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        assert resp.status_code == 200, resp.text
        return [m["id"] for m in resp.json()["data"]]

    def new_key(self, project: str, role: str) -> str:
        """A key made with the CLI, as an operator would."""
        import subprocess
        import sys

        out = subprocess.run(
            [sys.executable, "-m", "thinkforge.cli", "keys", "create", "--project", project,
             "--role", role],
            env=self.plane.env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[-1]

    def deploy(self, name: str, model: str, **options: Any) -> None:
        with self.api() as client:
            body = {"name": name, "model": model, "max_completion_tokens": 3600,
                    "request_timeout_s": 150, "default_thinking": {"max_tokens": 8}, **options}  # fmt: skip
            made = client.post("/v1/deployments", json=body)
            assert made.status_code == 200, made.text

    def wait_running(self, name: str, version: str | None = None, timeout: float = 300) -> None:
        with self.api() as client:
            until(
                lambda: (
                    (d := client.get(f"/v1/deployments/{name}").json())["status"] == "running"
                    and (version is None or d["served_version"] == version)
                ),
                timeout,
                f"deployment {name} never ran {version or ''}",
            )

    def replicas(self, name: str) -> int:
        """RUNNING replicas of a deployment, as Ray Serve reports them."""
        headers = {"Authorization": f"Bearer {self.cluster.token}"}
        apps = httpx.get(
            f"{self.cluster.dashboard_url}/api/serve/applications/", headers=headers, timeout=30
        ).json()["applications"]
        app = apps.get(f"model-{name}") or {}
        deployment = (app.get("deployments") or {}).get(f"model-{name}") or {}
        return sum(1 for r in deployment.get("replicas", []) if r.get("state") == "RUNNING")


def until(check: Callable[[], Any], timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, message
        time.sleep(0.5)


def sse(lines: Iterator[str]) -> Iterator[dict[str, Any] | str]:
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)


@pytest.fixture(scope="module")
def door(
    ray_cluster: LocalRayCluster, serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Door]:
    tmp = tmp_path_factory.mktemp("frontdoor")
    data = tmp / "data"
    uri, artifacts = f"sqlite:///{seed_mlflow_store(data / 'mlflow.db')}", str(data / "mlartifacts")
    tiny = ensure_tiny_model(tmp / "models")
    for i in (1, 2):
        assert register(uri, artifacts, tiny, f"ftjob-{i}") == f"{NAME}/{i}"
    plane = ControlPlane(
        data, ray_cluster,
        THINKFORGE_SERVE_PORT=str(serve_port), THINKFORGE_SERVE_REPLICA_CPUS="0.5",
        THINKFORGE_REDIS_URL="redis://127.0.0.1:6379/0",
        THINKFORGE_FRONTDOOR_REFRESH_S=str(REFRESH_S),
    ).start()  # fmt: skip
    try:
        d = Door(plane, f"http://127.0.0.1:{serve_port}", ray_cluster)
        with d.api() as client:
            put = client.put(f"/v1/registry/models/{NAME}/aliases/production", json={"version": 1})
            assert put.status_code == 200, put.text
        d.deploy(NAME, f"{NAME}@production")
        d.wait_running(NAME, f"{NAME}/1")
        yield d
    finally:
        plane.stop()


def test_keys_models_usage_and_metrics(door: Door) -> None:
    # No key, a wrong key: 401 on every front-door route but the health check.
    for resp in (door.chat(None), door.chat("tf-not-a-key"), httpx.get(f"{door.url}/v1/models")):
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{door.url}/healthz").status_code == 200

    app_key = door.new_key("default", "inference")
    answered = [door.chat(app_key) for _ in range(3)]
    assert all(r.status_code == 200 for r in answered), answered[0].text
    assert answered[0].headers["x-ratelimit-limit-requests"] == "600"
    assert door.models(app_key) == [NAME]

    # Another project: the deployment is absent, as if it did not exist.
    stranger = door.new_key("other", "member")
    missing = door.chat(stranger)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert door.models(stranger) == []
    with door.api() as client:  # public on purpose: every project's keys may call it
        assert client.patch(f"/v1/deployments/{NAME}", json={"public": True}).status_code == 200
        until(lambda: door.chat(stranger).status_code == 200, 30, "public never served")
        assert door.models(stranger) == [NAME]
        assert client.patch(f"/v1/deployments/{NAME}", json={"public": False}).status_code == 200
        until(lambda: door.chat(stranger).status_code == 404, 30, "private again never")

    # Usage adds up to what the answers said, per key, once the door has sent its batch.
    usages = [r.json()["usage"] for r in answered]
    with door.api() as client:
        app_key_id = next(
            k["id"] for k in client.get("/v1/keys").json()["data"] if k["role"] == "inference"
        )

        def recorded() -> dict[str, Any] | None:
            rows = client.get("/v1/usage", params={"group_by": "key"}).json()["data"]
            row = next((r for r in rows if r["group"] == app_key_id), None)
            return row if row and row["requests"] == 3 else None

        row = until(recorded, 30, "usage never arrived")
        assert row["prompt_tokens"] == sum(u["prompt_tokens"] for u in usages)
        assert row["completion_tokens"] == sum(u["completion_tokens"] for u in usages)
        assert row["reasoning_tokens"] == sum(
            u["completion_tokens_details"]["reasoning_tokens"] for u in usages
        )
        by_deployment = client.get("/v1/usage").json()["data"]
        assert by_deployment[0]["group"] == NAME

        # Metrics: the door's with an admin key only, the control plane's for scrapers.
        assert httpx.get(f"{door.url}/metrics", headers=auth(app_key)).status_code == 403
        text = httpx.get(f"{door.url}/metrics", headers=auth(API_KEY)).text
        for name in (
            "thinkforge_frontdoor_time_to_first_token_seconds_bucket",
            "thinkforge_frontdoor_time_per_output_token_seconds_bucket",
            "thinkforge_frontdoor_thinking_tokens_bucket",
        ):
            assert f'{name}{{deployment="{NAME}"' in text, name
        assert f'thinkforge_frontdoor_requests_total{{deployment="{NAME}",status="200"}}' in text
        assert "thinkforge_replica_batch_occupancy" in text
        assert (
            "thinkforge_api_request_duration_seconds_bucket"
            in httpx.get(f"{door.plane.url}/metrics").text
        )

        # A revoked key stops within the door's refresh (30 s at most by the issue).
        assert client.post(f"/v1/keys/{app_key_id}/revoke").status_code == 200
        revoked_at = time.monotonic()
        until(lambda: door.chat(app_key).status_code == 401, 30, "a revoked key kept working")
        assert time.monotonic() - revoked_at < 30


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_quota_answers_429_with_the_headers(door: Door) -> None:
    admin = door.new_key("limited", "admin")
    with door.api(admin) as client:
        assert client.patch("/v1/quotas", json={"requests_per_minute": 2}).status_code == 200
    with door.api() as client:
        assert client.patch(f"/v1/deployments/{NAME}", json={"public": True}).status_code == 200
    try:
        until(lambda: door.chat(admin).status_code == 200, 30, "never served the limited key")
        # The first answer may have come in this minute or the last: fill this one up.
        statuses = []
        while len(statuses) < 4 and 429 not in statuses:
            statuses.append((resp := door.chat(admin)).status_code)
        assert statuses[-1] == 429, statuses
        body = resp.json()["error"]
        assert body["type"] == "rate_limit_error" and body["code"] == "rate_limit_exceeded"
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
        assert resp.headers["x-ratelimit-limit-requests"] == "2"
        assert resp.headers["x-ratelimit-remaining-requests"] == "0"
        assert int(resp.headers["x-ratelimit-limit-tokens"]) > 0
        assert "x-ratelimit-remaining-tokens" in resp.headers
        assert door.chat(API_KEY).status_code == 200  # other keys are not held back
    finally:
        with door.api() as client:
            client.patch(f"/v1/deployments/{NAME}", json={"public": False})


def test_bounds_and_a_poison_request_fail_alone(door: Door) -> None:
    results: list[int] = []
    workers = [threading.Thread(target=lambda: results.append(door.chat(API_KEY).status_code))
               for _ in range(2)]  # fmt: skip
    for w in workers:
        w.start()
    poison = door.chat(API_KEY, seed=2**64, temperature=1.0)
    assert poison.status_code == 400 and poison.json()["error"]["param"] == "seed"
    for w in workers:
        w.join(timeout=180)
    assert results == [200, 200]
    many = [{"role": "user", "content": "x"}] * 257
    assert door.chat(API_KEY, messages=many).status_code == 400
    assert door.chat(API_KEY, stop=["x" * 300]).status_code == 400
    big = door.chat(API_KEY, messages=[{"role": "user", "content": "x" * 5_000_000}])
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
    long = door.chat(API_KEY, messages=[{"role": "user", "content": "Sum: 1 2 " * 3000}])
    assert long.status_code == 400 and "must fit in" in long.json()["error"]["message"]


def test_a_client_dropping_a_stream_frees_its_slot(door: Door) -> None:
    def occupancy() -> int:
        resp = httpx.get(f"{door.url}/v1/models", headers=auth(API_KEY), timeout=60)
        replica = resp.json()["data"][0]["thinkforge"].get("replica") or {}
        return int(replica.get("batch", 0)) + int(replica.get("queued", 0))

    body = {"model": NAME, "messages": [{"role": "user", "content": "Sum: 1 2"}],
            "stream": True, **LONG}  # fmt: skip
    started = time.monotonic()
    with httpx.stream(
        "POST", f"{door.url}/v1/chat/completions", json=body, headers=auth(API_KEY), timeout=300
    ) as whole:
        assert list(sse(whole.iter_lines()))[-1] == "[DONE]"
    full_s = time.monotonic() - started  # how long the slot is held when nobody leaves
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST", f"{door.url}/v1/chat/completions", json=body, headers=auth(API_KEY)
        ) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(5):
            next(lines)
        assert until(lambda: occupancy() >= 1, 30, "the stream never took a slot")
    # The connection is closed mid-stream: the replica drops the request between steps,
    # well before the stream would have ended.
    closed = time.monotonic()
    until(lambda: occupancy() == 0, 30, "a dropped stream kept its batch slot")
    assert time.monotonic() - closed < full_s / 2, (time.monotonic() - closed, full_s)


def test_streams_survive_a_rollout_and_another_deployment(door: Door) -> None:
    """Long streams back to back while another deployment is created and a promotion rolls
    this one: every stream ends whole, and one the old version was streaming when the new
    version had already taken traffic still ends whole (its replica drained, not cut)."""
    # version, start, end, events of each stream
    streams: list[tuple[str, float, float, list[dict[str, Any] | str]]] = []
    first_v2: list[float] = []
    stop = threading.Event()

    def stream() -> None:
        body = {"model": NAME, "messages": [{"role": "user", "content": "Sum: 4 5"}],
                "stream": True, **LONG}  # fmt: skip
        while not stop.is_set():
            start = time.monotonic()
            with httpx.stream(
                "POST", f"{door.url}/v1/chat/completions", json=body, headers=auth(API_KEY),
                timeout=300,
            ) as resp:  # fmt: skip
                assert resp.status_code == 200
                version = resp.headers["x-thinkforge-model-version"]
                events = list(sse(resp.iter_lines()))
            streams.append((version, start, time.monotonic(), events))

    def probe() -> None:
        while not first_v2 and not stop.is_set():
            start = time.monotonic()
            resp = door.chat(API_KEY)
            if resp.headers.get("x-thinkforge-model-version") == "2":
                first_v2.append(start)
            time.sleep(0.3)

    readers = [threading.Thread(target=stream) for _ in range(2)] + [threading.Thread(target=probe)]
    for r in readers:
        r.start()
    try:
        until(lambda: streams, 120, "no stream finished")
        door.deploy("other", f"{NAME}/1")  # another deployment: the door is not redeployed
        with door.api() as client:
            moved = client.put(
                f"/v1/registry/models/{NAME}/aliases/production", json={"version": 2}
            )
            assert moved.status_code == 200, moved.text
        door.wait_running("other")
        door.wait_running(NAME, f"{NAME}/2")
        until(lambda: first_v2, 60, "version 2 never answered")
        until(lambda: any(v == "2" for v, *_ in streams), 120, "no stream from version 2")
    finally:
        stop.set()
        for r in readers:
            r.join(timeout=300)
    for *_, events in streams:
        assert events[-1] == "[DONE]", events[-3:]
        assert not any(isinstance(e, dict) and "error" in e for e in events)
        finish = [e for e in events if isinstance(e, dict) and e["choices"]
                  and e["choices"][0]["finish_reason"]]  # fmt: skip
        assert finish and finish[-1]["thinking"]["tokens"] == 3000
    # The new version answered first when this request or stream was sent.
    took_over = min([first_v2[0]] + [start for v, start, _, _ in streams if v == "2"])
    drained = [end for v, _, end, _ in streams if v == "1" and end > took_over]
    assert drained, "no old-version stream was still running when the new version took over"
    assert door.chat(API_KEY, model="other").status_code == 200
    with door.api() as client:
        assert client.delete("/v1/deployments/other").status_code == 200


def test_autoscaling_grows_under_load_and_shrinks_after(door: Door) -> None:
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
               "upscale_delay_s": 0, "downscale_delay_s": 5}  # fmt: skip
    door.deploy("auto", f"{NAME}/1", autoscaling=scaling, max_ongoing_requests=2)
    door.wait_running("auto")
    seen: set[str] = set()
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            resp = door.chat(API_KEY, model="auto", max_completion_tokens=600,
                             thinking={"min_tokens": 500, "max_tokens": 500})  # fmt: skip
            if resp.status_code == 200:
                seen.add(resp.headers["x-thinkforge-replica"])

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        until(lambda: len(seen) >= 2, 240, f"a second replica never served ({seen})")
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=300)
    until(lambda: door.replicas("auto") == 1, 180, "the second replica never went away")
    with door.api() as client:
        assert client.delete("/v1/deployments/auto").status_code == 200
