"""RayJobLauncher at unit level: a recording JobSubmissionClient and a scripted dashboard
state API (httpx.MockTransport). The real Ray APIs are exercised by tests/integration."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from thinkforge.jobs.__main__ import parse_args
from thinkforge.jobs.evaluate import parse_args as parse_eval_args
from thinkforge.platform.launcher import CannotFit, LaunchState, ModuleLaunch, TrainingLaunch
from thinkforge.platform.ray_launcher import RayJobLauncher

URI = "postgresql://mlflow:s3cr3t@db.internal/mlflow"


class RecordingClient:
    def __init__(self) -> None:
        self.submitted: list[dict[str, Any]] = []
        self.info: Any = None

    def submit_job(self, **kwargs: Any) -> str:
        self.submitted.append(kwargs)
        return str(kwargs["submission_id"])

    def get_job_info(self, job_id: str) -> Any:
        return self.info

    def list_jobs(self) -> list[Any]:
        return []


def launcher() -> tuple[RayJobLauncher, RecordingClient]:
    ray = RayJobLauncher(
        "http://127.0.0.1:1", mlflow_tracking_uri=URI, storage_path="/ckpt", data_dir="/data"
    )
    client = RecordingClient()
    ray._client = client
    return ray, client


def test_the_mlflow_uri_reaches_jobs_in_their_environment_not_their_command_line() -> None:
    ray, client = launcher()
    ray._http = dashboard([])
    ray.submit(TrainingLaunch(job_id="ftjob-1", config={"model": "m"}))
    ray.submit(ModuleLaunch(job_id="eval-1", module="thinkforge.jobs.evaluate"))
    for submitted in client.submitted:
        assert URI not in submitted["entrypoint"] and "s3cr3t" not in submitted["entrypoint"]
        assert submitted["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == URI


def test_the_job_entrypoints_read_the_uri_from_their_environment(monkeypatch: Any) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", URI)
    job = parse_args(["--job-id", "ftjob-1", "--config-json", "{}"])
    evaluation = parse_eval_args(["--eval-id", "eval-1", "--config-json", "{}", "--output", "o"])
    assert job.mlflow_uri == URI and evaluation.mlflow_uri == URI
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert parse_args(["--job-id", "j", "--config-json", "{}"]).mlflow_uri is None


def dashboard(
    groups: list[dict[str, Any]], nodes: list[dict[str, Any]] | None = None
) -> httpx.Client:
    """The state API of a 2-CPU, 1-node cluster in which a Serve replica holds 1 CPU."""
    actors = [
        {"state": "ALIVE", "class_name": "ServeReplica:sums:SumsModel", "job_id": "01000000",
         "required_resources": {"CPU": 1.0}, "placement_group_id": None},
        {"state": "ALIVE", "class_name": "JobSupervisor", "job_id": "01000000",
         "required_resources": {}, "placement_group_id": None},
    ]  # fmt: skip
    listings = {
        "/api/v0/nodes": [{"state": "ALIVE", "resources_total": {"CPU": 2.0, "memory": 1e9}}]
        if nodes is None
        else nodes,
        "/api/v0/actors": actors,
        "/api/v0/placement_groups": groups,
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/cluster_status":
            usage = {"usage": {"CPU": [1.0, 2.0], "memory": [0.0, 1e9]}}
            return httpx.Response(
                200, json={"data": {"clusterStatus": {"loadMetricsReport": usage}}}
            )
        result = {"result": {"result": listings[request.url.path]}}
        return httpx.Response(200, json={"data": result})

    return httpx.Client(base_url="http://dashboard", transport=httpx.MockTransport(handler))


class JobInfo:
    def __init__(self, metadata: dict[str, str]) -> None:
        self.status, self.job_id, self.message, self.metadata = "RUNNING", "02000000", "", metadata


def test_a_run_larger_than_the_cluster_is_refused_unless_it_autoscales() -> None:
    ray, client = launcher()
    ray._http = dashboard([])
    with pytest.raises(CannotFit, match=r"3 workers with 1 CPU each \(3 CPU in all\).*2 CPU"):
        ray.submit(TrainingLaunch(job_id="ftjob-big", config={"resources": {"num_workers": 3}}))
    with pytest.raises(CannotFit, match="1 GPU each"):
        ray.submit(TrainingLaunch(job_id="ftjob-gpu", config={"resources": {"gpus_per_worker": 1}}))
    assert client.submitted == []
    ray.submit(TrainingLaunch(job_id="ftjob-fits", config={"resources": {"num_workers": 2}}))
    ray._http = dashboard([], nodes=[])  # a head still registering: Ray decides
    ray.submit(TrainingLaunch(job_id="ftjob-early", config={"resources": {"num_workers": 3}}))
    ray._http = dashboard([])
    ray.autoscaling = True
    ray.submit(TrainingLaunch(job_id="ftjob-big", config={"resources": {"num_workers": 3}}))
    assert [s["submission_id"] for s in client.submitted] == [
        "ftjob-fits",
        "ftjob-early",
        "ftjob-big",
    ]


def test_a_run_whose_workers_wait_is_pending_and_says_for_what() -> None:
    ray, client = launcher()
    ask = '{"workers": 2, "per_worker": {"CPU": 1.0}}'
    client.info = JobInfo({"thinkforge_ask": ask})
    pending = {"creator_job_id": "02000000", "state": "PENDING", "bundles": []}
    ray._http = dashboard([pending])
    status = ray.status("ftjob-1")
    assert status.state is LaunchState.PENDING and status.waiting == {
        "asked": {"workers": 2, "per_worker": {"CPU": 1.0}},
        "free": {"CPU": 1.0},
        "total": {"CPU": 2.0},
        "held_by": [
            {"holder": "Serve deployment SumsModel of app sums", "resources": {"CPU": 1.0}}
        ],
    }
    assert status.message == (
        "Waiting for workers: asks 2 x 1 CPU; free 1 CPU of 2 CPU; held by Serve deployment "
        "SumsModel of app sums (1 CPU)"
    )
    ray._http = dashboard([{**pending, "state": "CREATED"}])
    assert ray.status("ftjob-1").state is LaunchState.RUNNING
    ray._http = dashboard([])  # its group is gone (training ended): still running
    assert ray.status("ftjob-1").state is LaunchState.RUNNING
    client.info = JobInfo({})  # an evaluation: no workers to place
    assert ray.status("eval-1").state is LaunchState.RUNNING
