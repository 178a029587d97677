"""An MoE job's expert load through the REST API: the heatmap its run logged at a
checkpoint (GET /v1/fine_tuning/jobs/{id}/experts.png) and the router metrics in its
step events; a dense job has neither. Real HTTP, a real MLflow store, a fake launcher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from tests.platform.conftest import Api
from tests.platform.data import S1K, jsonl
from tests.platform.test_api_files import assert_error, upload
from thinkforge.contract import EXPERTS_PLOT, MOE_STEP_METRICS
from thinkforge.jobs.config import SFTConfig
from thinkforge.jobs.moe import expert_heatmap, load_metrics
from thinkforge.jobs.tracking import MetricLogger, open_job_run
from thinkforge.platform.models import Job


def start_run(api: Api, job_id: str, steps: list[dict[str, float]]) -> MetricLogger:
    """The job's MLflow run with ``steps`` logged, as rank 0 of a training job logs them."""
    uri = api.settings.mlflow_tracking_uri
    config = SFTConfig(model="thinkforge/tiny", dataset="train.jsonl")
    run_id = open_job_run(
        tracking_uri=uri, job_id=job_id, config=config, dataset_sha256="d" * 64,
        artifact_root=api.settings.mlflow_artifact_root,
    )  # fmt: skip
    logger = MetricLogger(uri, run_id)
    for step, metrics in enumerate(steps, start=1):
        logger.log({"loss": 3.0 - step, **metrics}, step=step)
    logger.flush()
    return logger


def sync(api: Api, job_id: str, *, final: bool) -> None:
    ctx = api.app.state.ctx  # type: ignore[attr-defined]
    with ctx.sessions.begin() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        ctx.tracker.sync(session, job, final=final)


def create_job(api: Api) -> str:
    file_id = upload(api, jsonl(S1K, S1K)).json()["id"]
    resp = api.client.post(
        "/v1/fine_tuning/jobs", json={"model": "thinkforge/tiny", "training_file": file_id}
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


def heatmap(api: Api, job_id: str):  # type: ignore[no-untyped-def]
    return api.client.get(f"/v1/fine_tuning/jobs/{job_id}/experts.png")


@pytest.fixture
def moe_steps() -> list[dict[str, float]]:
    counts = [torch.tensor([[6.0, 2.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]]), torch.ones(2, 4)]
    return [load_metrics(c, aux=1.5 - i, z=0.1) for i, c in enumerate(counts)]


def test_an_moe_jobs_heatmap_and_router_metrics_a_dense_job_has_neither(
    api: Api, moe_steps: list[dict[str, float]], tmp_path: Path
) -> None:
    job_id = create_job(api)
    assert assert_error(heatmap(api, job_id), 404, "fine_tuning_job_id")["code"] == (
        "expert_heatmap_not_found"
    )  # no run yet
    logger = start_run(api, job_id, moe_steps)
    sync(api, job_id, final=False)
    assert_error(heatmap(api, job_id), 404)  # a run, but no checkpoint has logged it yet
    png = expert_heatmap(moe_steps[-1], step=2, path=tmp_path / EXPERTS_PLOT)
    assert png is not None
    logger.log_artifact(png)
    got = heatmap(api, job_id)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert got.content == png.read_bytes()
    with api.keyed(api.new_key("other-project")) as other:
        resp = other.get(f"/v1/fine_tuning/jobs/{job_id}/experts.png")
        assert assert_error(resp, 404)["code"] == "not_found"  # the job, not its heatmap
    assert_error(heatmap(api, "ftjob-nope"), 404, "fine_tuning_job_id")

    sync(api, job_id, final=True)
    events = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100})
    steps = {e["data"]["step"]: e["data"] for e in events.json()["data"] if e["type"] == "metrics"}
    assert sorted(steps) == [1, 2]
    assert {k: steps[1][k] for k in MOE_STEP_METRICS} == {
        "moe_aux_loss": 1.5, "moe_z_loss": pytest.approx(0.1), "moe_imbalance": 3.0
    }  # fmt: skip
    assert steps[2]["moe_imbalance"] == 1.0  # every expert alike
    assert "moe_load_l0_e0" not in steps[1]  # per-expert loads: MLflow, checkpoints, heatmap

    # A dense job (same store: one MLflow database per test is what costs here).
    job_id = create_job(api)
    start_run(api, job_id, [{}, {}])
    sync(api, job_id, final=True)
    error = assert_error(heatmap(api, job_id), 404, "fine_tuning_job_id")
    assert error["code"] == "expert_heatmap_not_found" and "dense" in error["message"]
    events = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100})
    steps = [e["data"] for e in events.json()["data"] if e["type"] == "metrics"]
    assert len(steps) == 2 and not [k for s in steps for k in s if k.startswith("moe_")]
