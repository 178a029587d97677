"""Fine-tune jobs end to end: REST -> Ray Job -> Ray Train (2 DDP workers) -> MLflow -> REST;
a mixture-of-experts job on to Ray Serve and a budget-forced chat.

One local Ray head for the module; the control plane runs as a real process so that a
test can kill it mid-job the way a crash would.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port
from tests.integration.conftest import API_KEY, ControlPlane, serving_plane
from thinkforge.contract import MOE_AUX_LOSS, MOE_IMBALANCE, expert_load_metric
from thinkforge.jobs.synthetic import write_jsonl, write_mixed_jsonl
from thinkforge.platform.mlflow_server import MlflowServer
from thinkforge.platform.ray_cluster import LocalRayCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TERMINAL = {"succeeded", "failed", "cancelled"}


def upload_sums(client: httpx.Client, tmp_path: Path, n: int = 128) -> str:
    path = tmp_path / "sums.jsonl"
    write_jsonl(path, n=n, seed=0)
    with open(path, "rb") as fh:
        resp = client.post(
            "/v1/files", files={"file": ("sums.jsonl", fh)}, data={"purpose": "fine-tune"}
        )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


def create_job(client: httpx.Client, file_id: str, **hyper: Any) -> dict[str, Any]:
    body = {
        "model": "thinkforge/tiny",
        "training_file": file_id,
        "recipe": "tiny-cpu",
        "suffix": "sums-e2e",
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "config": {"checkpoint_every_steps": 4},
    }
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def wait_job(
    client: httpx.Client, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = dict(client.get(f"/v1/fine_tuning/jobs/{job_id}").json())
        if until(job):
            return job
        assert job["status"] not in TERMINAL, f"job ended {job['status']}: {job['error']}"
        assert time.monotonic() < deadline, f"job still {job['status']} after {timeout}s"
        time.sleep(1)


def events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return list(
        client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    )


def metric_steps(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    found = [e["data"] for e in events(client, job_id) if e["type"] == "metrics"]
    return sorted(found, key=lambda d: d["step"])


def ray_submissions(cluster: LocalRayCluster, job_id: str) -> list[Any]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(
        cluster.dashboard_url, headers={"Authorization": f"Bearer {cluster.token}"}
    )
    return [j for j in client.list_jobs() if j.submission_id == job_id]


def test_job_trains_survives_a_control_plane_crash_and_links_everything(
    ray_cluster: LocalRayCluster, tmp_path: Path, pg_database: str
) -> None:
    """Tracked in a real `mlflow server` on PostgreSQL, with artifacts proxied by it."""
    data_dir = tmp_path / "data"
    server = MlflowServer(pg_database, str(tmp_path / "mlflow-artifacts"), port=free_port())
    with server:
        env = {
            "THINKFORGE_MLFLOW_TRACKING_URI": server.url,
            "THINKFORGE_MLFLOW_ARTIFACT_ROOT": "mlflow-artifacts:/",
        }
        first = ControlPlane(data_dir, ray_cluster, **env).start()
        try:
            with first.client() as client:
                file_id = upload_sums(client, tmp_path)
                job = create_job(client, file_id, n_epochs=1, max_steps=8)
                wait_job(client, job["id"], lambda j: j["status"] == "running", timeout=240)
        finally:
            first.kill()  # mid-job, like a crash: no shutdown code runs
        second = ControlPlane(data_dir, ray_cluster, **env).start()
        try:
            with second.client() as client:
                done = wait_job(client, job["id"], lambda j: j["status"] in TERMINAL, timeout=400)
                check_finished_job(client, job["id"], done)
        finally:
            second.stop()
        check_mlflow(MlflowClient(tracking_uri=server.url), job["id"], done)
    assert len(ray_submissions(ray_cluster, job["id"])) == 1
    with sqlite3.connect(data_dir / "thinkforge.db") as db:
        mirrored = db.execute("SELECT name, version, job_id, recipe FROM model_versions").fetchall()
    assert mirrored == [("sums-e2e", 1, job["id"], "tiny-cpu")]


def check_finished_job(client: httpx.Client, job_id: str, done: dict[str, Any]) -> None:
    assert done["status"] == "succeeded", done["error"]
    assert done["finished_at"] is not None and done["fine_tuned_model"] == "sums-e2e/1"
    steps = metric_steps(client, job_id)
    assert [s["step"] for s in steps] == list(range(steps[0]["step"], steps[0]["step"] + 8))
    assert steps[-1]["loss"] < steps[0]["loss"]
    ckpts = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert sorted(c["step_number"] for c in ckpts) == [4, 8]
    assert all(f"/{job_id}/" in c["fine_tuned_model_checkpoint"] for c in ckpts)
    for c in ckpts:  # OpenAI's names beside ours
        assert c["metrics"]["train_loss"] == c["metrics"]["loss"]
        assert 0 <= c["metrics"]["train_mean_token_accuracy"] <= 1
    (result,) = done["result_files"]
    table = client.get(f"/v1/files/{result}/content").text.splitlines()
    assert table[0].startswith("step,train_loss,train_accuracy,valid_loss")
    assert [int(row.split(",")[0]) for row in table[1:]] == [s["step"] for s in steps]
    messages = [e["message"] for e in events(client, job_id)]
    assert any("Registered model version sums-e2e/1" in m for m in messages)
    (data,) = [e["data"] for e in events(client, job_id) if e["message"].startswith("Dataset:")]
    assert 0 < data["kept"] <= data["records"] and data["block_size"] == 192  # tiny-cpu's
    version = client.get("/v1/registry/models/sums-e2e/versions/1").json()
    assert version["lineage"]["job_id"] == job_id and version["lineage"]["recipe"] == "tiny-cpu"
    assert (
        version["lineage"]["base_model"] == "thinkforge/tiny"
        and version["run_id"] == done["mlflow_run_id"]
    )
    assert "loss" in version["metrics"] and "model.safetensors" in version["manifest"]


def check_mlflow(mlflow: MlflowClient, job_id: str, done: dict[str, Any]) -> None:
    run = mlflow.get_run(done["mlflow_run_id"])
    assert run.data.tags["job_id"] == job_id and run.info.status == "FINISHED"
    assert run.data.tags["recipe"] == "tiny-cpu"
    version = mlflow.get_model_version("sums-e2e", "1")
    assert version.tags["job_id"] == job_id and version.run_id == run.info.run_id
    assert len(mlflow.get_metric_history(run.info.run_id, "loss")) == 8


def train_worker_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [
        line for line in out.splitlines() if "RayTrainWorker" in line or "TrainController" in line
    ]


def upload_sums_parquet(client: httpx.Client, tmp_path: Path, n: int = 128) -> str:
    """The sums dataset as a parquet upload (the s1K schema the synthetic rows use)."""
    import json

    from tests.platform.data import parquet

    path = write_jsonl(tmp_path / "sums-p.jsonl", n=n, seed=0)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    resp = client.post(
        "/v1/files",
        files={"file": ("sums.parquet", parquet(*rows))},
        data={"purpose": "fine-tune"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["num_records"] == n
    return str(resp.json()["id"])


def test_pause_resume_and_cancel_mid_run_with_the_openai_sdk(
    ray_cluster: LocalRayCluster, tmp_path: Path
) -> None:
    """A parquet upload trains; the official openai SDK pauses the run (it checkpoints and
    stops) and resumes it (a new submission that goes on from that checkpoint); a cancel
    then stops the resumed run and its workers."""
    import openai

    plane = ControlPlane(tmp_path / "data", ray_cluster).start()
    try:
        with plane.client() as client:
            sdk = openai.OpenAI(base_url=f"{plane.url}/v1", api_key=API_KEY, max_retries=0)
            file_id = upload_sums_parquet(client, tmp_path)
            job = create_job(client, file_id, n_epochs=100)
            running = wait_job(
                client, job["id"], lambda j: j["estimated_finish"] is not None, timeout=300
            )  # measured from its steps
            assert running["status"] == "running"
            assert running["estimated_finish"] > running["started_at"]
            assert sdk.fine_tuning.jobs.pause(job["id"]).status == "pausing"
            paused = wait_job(client, job["id"], lambda j: j["status"] == "paused", timeout=180)
            assert paused["finished_at"] is None
            ckpts = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
            at = max(c["step_number"] for c in ckpts)
            assert [s["step"] for s in metric_steps(client, job["id"])][-1] == at
            with pytest.raises(openai.ConflictError):
                sdk.fine_tuning.jobs.pause(job["id"])  # paused, not running

            assert sdk.fine_tuning.jobs.resume(job["id"]).status == "queued"
            wait_job(
                client, job["id"],
                lambda j: any(s["step"] > at + 1 for s in metric_steps(client, j["id"])),
                timeout=300,
            )  # fmt: skip
            steps = [s["step"] for s in metric_steps(client, job["id"])]
            assert steps == list(range(steps[0], steps[-1] + 1))  # on from the pause, no repeat
            resp = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
            assert resp.status_code == 200 and resp.json()["status"] in ("cancelling", "cancelled")
            done = wait_job(client, job["id"], lambda j: j["status"] in TERMINAL, timeout=120)
            assert done["status"] == "cancelled" and done["finished_at"] is not None
    finally:
        plane.stop()
    (first,) = ray_submissions(ray_cluster, job["id"])
    (resumed,) = ray_submissions(ray_cluster, f"{job['id']}-resume-1")
    assert (first.status, resumed.status) == ("SUCCEEDED", "STOPPED")
    deadline = time.monotonic() + 60
    while train_worker_processes() and time.monotonic() < deadline:
        time.sleep(1)
    assert train_worker_processes() == []


def test_missing_base_model_fails_early_with_a_clear_error(
    ray_cluster: LocalRayCluster, tmp_path: Path
) -> None:
    plane = ControlPlane(tmp_path / "data", ray_cluster).start()
    missing = tmp_path / "data" / "datasets" / "no-such-base-model"  # under the allowed root
    try:
        with plane.client() as client:
            file_id = upload_sums(client, tmp_path, n=16)
            resp = client.post(
                "/v1/fine_tuning/jobs",
                json={
                    "model": str(missing),
                    "training_file": file_id,
                    "recipe": "tiny-cpu",
                },
            )
            job = resp.json()
            done = wait_job(client, job["id"], lambda j: j["status"] in TERMINAL, timeout=180)
    finally:
        plane.stop()
    assert done["status"] == "failed"
    assert done["error"]["code"] == "training_failed"
    message = done["error"]["message"]
    assert str(missing) in message.splitlines()[0]
    assert "Traceback" not in message.splitlines()[0]


# ---------------------------------------------------------------- a mixture of experts
# thinkforge/tiny-moe through the REST API with 2 DDP workers and Qwen's global-batch
# balance loss; its router metrics and expert heatmap over REST; the registered version
# deployed on Ray Serve and answering a budget-forced chat.

MOE_NAME = "moe-e2e"
PNG = b"\x89PNG\r\n\x1a\n"


def train_moe(client: httpx.Client, tmp_path: Path) -> dict[str, Any]:
    data = write_mixed_jsonl(tmp_path / "mixed.jsonl", n=64, seed=0)
    with open(data, "rb") as fh:
        upload = client.post(
            "/v1/files", files={"file": ("mixed.jsonl", fh)}, data={"purpose": "fine-tune"}
        )
    assert upload.status_code == 200, upload.text
    body = {
        "model": "thinkforge/tiny-moe", "training_file": upload.json()["id"],
        "recipe": "tiny-moe-cpu", "suffix": MOE_NAME,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"max_steps": 2}}},
    }  # fmt: skip
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 200, resp.text
    job = dict(resp.json())
    assert job["config"]["moe"]["balance"] == "global"  # the recipe's default
    return wait_job(client, job["id"], lambda j: j["status"] in TERMINAL, timeout=400)


def check_router_metrics(client: httpx.Client, job_id: str) -> None:
    steps = metric_steps(client, job_id)
    assert [s["step"] for s in steps] == [1, 2]
    assert all(0 < s[MOE_AUX_LOSS] < 4 and s[MOE_IMBALANCE] >= 1 for s in steps)
    ckpts = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    (ckpt,) = ckpts  # the recipe checkpoints every 125 steps: only the last here
    assert ckpt["step_number"] == 2
    for layer in range(2):  # the step's expert load: 2 layers x 4 experts
        shares = [ckpt["metrics"][expert_load_metric(layer, e)] for e in range(4)]
        assert sum(shares) == pytest.approx(1.0)


def wait_moe_deployment(client: httpx.Client, version: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        dep = dict(client.get(f"/v1/deployments/{MOE_NAME}").json())
        if dep["status"] == "running" and dep["served_version"] == version:
            return
        assert dep["status"] not in ("failed", "degraded"), dep
        assert time.monotonic() < deadline, dep
        time.sleep(1)


def test_moe_job_trains_shows_its_experts_and_serves_with_budget_forcing(
    ray_cluster: LocalRayCluster, tmp_path: Path
) -> None:
    """Last in this module: its deployment holds part of the cluster to the end. Two
    steps only: what the dense model's flows cover (crash, cancel, rollouts) is not
    repeated."""
    plane, serve_port = serving_plane(tmp_path / "data", ray_cluster)
    try:
        with plane.client() as client:
            done = train_moe(client, tmp_path)
            assert done["status"] == "succeeded", done["error"]
            job_id = done["id"]
            assert done["fine_tuned_model"] == f"{MOE_NAME}/1"
            check_router_metrics(client, job_id)
            messages = [e["message"] for e in events(client, job_id)]
            assert f"Registered model version {MOE_NAME}/1" in " ".join(messages)
            version = client.get(f"/v1/registry/models/{MOE_NAME}/versions/1").json()
            assert version["lineage"]["base_model"] == "thinkforge/tiny-moe"

            heatmap = client.get(f"/v1/fine_tuning/jobs/{job_id}/experts.png")
            assert heatmap.status_code == 200, heatmap.text
            assert heatmap.headers["content-type"] == "image/png"
            assert heatmap.content.startswith(PNG)

            made = client.post("/v1/deployments", json={"name": MOE_NAME, "model": f"{MOE_NAME}/1"})
            assert made.status_code == 200, made.text
            wait_moe_deployment(client, f"{MOE_NAME}/1")
            thinking = {"max_tokens": 12, "min_tokens": 6, "num_waits": 1, "wait_string": "Wait"}
            resp = httpx.post(
                f"http://127.0.0.1:{serve_port}/v1/chat/completions",
                json={"model": MOE_NAME, "messages": [{"role": "user", "content": "Sum: 1 2"}],
                      "max_completion_tokens": 24, "temperature": 0, "thinking": thinking},
                headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
            )  # fmt: skip
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-thinkforge-model-version"] == "1"
            body = resp.json()
            summary = body["thinking"]
            reasoning = body["usage"]["completion_tokens_details"]["reasoning_tokens"]
            # Thinking ends at the cap (max wins over min and waits) or, once the model
            # tried to end it and got its one wait, by itself: after min_tokens either way.
            assert 6 <= summary["tokens"] <= 12 and reasoning == summary["tokens"]
            assert summary["waits_inserted"] <= 1
            assert summary["forced_end"] or summary["waits_inserted"] == 1
            assert body["choices"][0]["message"]["reasoning_content"]
    finally:
        plane.stop()
