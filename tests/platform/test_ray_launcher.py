"""RayJobLauncher's submissions, seen by a recording JobSubmissionClient (unit level; the
real Ray Job API is exercised by tests/integration)."""

from __future__ import annotations

from typing import Any

from thinkforge.jobs.__main__ import parse_args
from thinkforge.jobs.evaluate import parse_args as parse_eval_args
from thinkforge.platform.launcher import LaunchSpec
from thinkforge.platform.ray_launcher import RayJobLauncher

URI = "postgresql://mlflow:s3cr3t@db.internal/mlflow"


class RecordingClient:
    def __init__(self) -> None:
        self.submitted: list[dict[str, Any]] = []

    def submit_job(self, **kwargs: Any) -> str:
        self.submitted.append(kwargs)
        return str(kwargs["submission_id"])


def launcher() -> tuple[RayJobLauncher, RecordingClient]:
    ray = RayJobLauncher(
        "http://127.0.0.1:1", mlflow_tracking_uri=URI, storage_path="/ckpt", data_dir="/data"
    )
    client = RecordingClient()
    ray._client = client
    return ray, client


def test_the_mlflow_uri_reaches_jobs_in_their_environment_not_their_command_line() -> None:
    ray, client = launcher()
    ray.submit(LaunchSpec(job_id="ftjob-1", config={"model": "m"}))
    ray.submit(LaunchSpec(job_id="eval-1", config={}, module="thinkforge.jobs.evaluate"))
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
