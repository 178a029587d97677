"""Two control-plane replicas (`thinkforge up` processes) on one PostgreSQL and one Ray
head: one job created through both at once, its leader frozen (SIGSTOP) and then killed
(kill -9) mid-run; it finishes once, with every status change and one registered version.

One Ray head for the module; the lease is shortened to 5 s so that failovers are quick.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ControlPlane
from tests.integration.test_training_e2e import (
    TERMINAL,
    events,
    metric_steps,
    ray_submissions,
    upload_sums,
    wait_job,
)
from thinkforge.platform.ray_cluster import LocalRayCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]
LEASE_S = 5.0
FAILOVER_S = 15.0  # the bound; the lease above makes it at most 6.7 s


def reconciler(plane: ControlPlane) -> dict[str, Any]:
    return dict(httpx.get(f"{plane.url}/readyz", timeout=5).json()["reconciler"])


def wait_leader(plane: ControlPlane, timeout: float = FAILOVER_S) -> float:
    """Seconds until ``plane`` leads; fails after ``timeout``."""
    start = time.monotonic()
    while not reconciler(plane)["is_leader"]:
        assert time.monotonic() - start < timeout, f"{plane.url} did not take over"
        time.sleep(0.2)
    return time.monotonic() - start


def the_leader(planes: list[ControlPlane]) -> ControlPlane:
    """The one replica that leads (waiting out a lease changing hands)."""
    start = time.monotonic()
    while True:
        leaders = [p for p in planes if reconciler(p)["is_leader"]]
        if len(leaders) == 1:
            return leaders[0]
        assert time.monotonic() - start < FAILOVER_S, f"{len(leaders)} leaders"
        time.sleep(0.2)


def create_on_both(planes: list[ControlPlane], file_id: str) -> str:
    """The same create, with one Idempotency-Key, on every replica at once."""
    body = {
        "model": "thinkforge/tiny",
        "training_file": file_id,
        "recipe": "tiny-cpu",
        "suffix": "sums-ha",
        "hyperparameters": {"n_epochs": 8},  # 64 steps: still training after both failovers
        "config": {"checkpoint_every_steps": 1000},
    }

    def create(plane: ControlPlane) -> httpx.Response:
        with plane.client() as client:
            return client.post(
                "/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "ha-create-1"}
            )

    with ThreadPoolExecutor(len(planes)) as pool:
        responses = list(pool.map(create, planes))
    assert all(r.status_code in (200, 409) for r in responses), [r.text for r in responses]
    ids = {r.json()["id"] for r in responses if r.status_code == 200}
    for plane, resp in zip(planes, responses, strict=True):
        if resp.status_code == 409:  # the other's request was still in flight: replay now
            ids.add(create(plane).json()["id"])
    assert len(ids) == 1, ids
    return ids.pop()


def test_two_replicas_one_job_through_a_frozen_and_a_killed_leader(
    ray_cluster: LocalRayCluster, tmp_path: Path, pg_database: str
) -> None:
    env = {"THINKFORGE_DATABASE_URL": pg_database, "THINKFORGE_LEADER_LEASE_S": str(LEASE_S)}
    planes = [
        ControlPlane(tmp_path / "data", ray_cluster, THINKFORGE_REPLICA_ID=name, **env)
        for name in ("replica-a", "replica-b")
    ]
    try:
        for plane in planes:
            plane.start()
        with planes[0].client() as client:
            file_id = upload_sums(client, tmp_path)
        job_id = create_on_both(planes, file_id)
        with planes[1].client() as client:
            assert len(client.get("/v1/fine_tuning/jobs").json()["data"]) == 1
            wait_job(client, job_id, lambda j: bool(metric_steps(client, j["id"])), timeout=300)
        leader = the_leader(planes)
        (other,) = [p for p in planes if p is not leader]

        # A frozen leader: the other takes over, and the thawed one stops reconciling.
        assert leader.proc is not None
        leader.proc.send_signal(signal.SIGSTOP)
        frozen_s = wait_leader(other)
        leader.proc.send_signal(signal.SIGCONT)
        time.sleep(1)
        thawed = reconciler(leader)
        assert thawed["is_leader"] is False and thawed["leader"] == reconciler(other)["replica"]
        with other.client() as client:
            assert job_status(client, job_id) == "running", "the job ended too soon to test"

        # A killed leader: the thawed ex-leader takes over and finishes the job.
        other.kill()
        killed_s = wait_leader(leader)
        with leader.client() as client:
            done = wait_job(client, job_id, lambda j: j["status"] in TERMINAL, timeout=400)
            check_exactly_once(client, job_id, done)
        print(f"failover: frozen leader {frozen_s:.1f} s, killed leader {killed_s:.1f} s")
    finally:
        for plane in planes:
            if plane.proc is not None and plane.proc.poll() is None:
                plane.proc.send_signal(signal.SIGCONT)
            plane.stop()
    assert len(ray_submissions(ray_cluster, job_id)) == 1


def job_status(client: httpx.Client, job_id: str) -> str:
    return str(client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"])


def check_exactly_once(client: httpx.Client, job_id: str, done: dict[str, Any]) -> None:
    assert done["status"] == "succeeded", done["error"]
    assert done["fine_tuned_model"] == "sums-ha/1"
    versions = client.get("/v1/registry/models/sums-ha/versions").json()["data"]
    assert [v["version"] for v in versions] == [1]
    found = events(client, job_id)
    statuses = [e["data"]["status"] for e in found if (e["data"] or {}).get("status")]
    assert sorted(statuses) == sorted(["queued", "running", "succeeded"]), statuses
    registered = [e for e in found if e["message"].startswith("Registered model version")]
    assert len(registered) == 1
    steps = [e["data"]["step"] for e in found if e["type"] == "metrics"]
    assert len(steps) == len(set(steps)) and steps
