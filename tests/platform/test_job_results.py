"""OpenAI's job fields: estimated_finish, result_files (a downloadable CSV of per-step
metrics) and checkpoint metrics under OpenAI's names, over real HTTP."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, datetime

import openai

from tests.platform.conftest import BOOTSTRAP_KEY, Api, add_job
from tests.platform.test_api_files import assert_error
from thinkforge.platform.jobs import add_event
from thinkforge.platform.models import Checkpoint, Job, new_id
from thinkforge.platform.status import JobStatus
from thinkforge.platform.tracker import estimate_finish, write_result_file


@dataclass
class Point:
    step: int
    value: float
    timestamp: int  # ms, as MLflow keeps them


def test_estimated_finish_is_the_median_step_time_times_the_steps_left() -> None:
    start = 1_700_000_000_000
    # 2 s a step, with a 10-minute pause between steps 5 and 6
    loss = [Point(s, 1.0, start + 2000 * s + (600_000 if s > 5 else 0)) for s in range(1, 11)]
    total = [Point(s, 100.0, p.timestamp) for s, p in zip(range(1, 11), loss, strict=True)]
    finish = estimate_finish({"loss": loss, "total_steps": total})
    assert finish == datetime.fromtimestamp((loss[-1].timestamp + 90 * 2000) / 1000, UTC)
    assert estimate_finish({"loss": loss[:1], "total_steps": total}) is None
    assert estimate_finish({"loss": [], "total_steps": []}) is None


def test_result_file_estimated_finish_and_checkpoint_metrics_over_the_api(api: Api) -> None:
    sessions = api.app.state.ctx.sessions  # type: ignore[attr-defined]
    with sessions.begin() as session:
        job = add_job(session, status=JobStatus.RUNNING)
        job_id = job.id
        for step in (1, 2):
            data = {"step": step, "loss": 2.0 / step, "token_accuracy": 0.4 * step, "lr": 1e-3}
            add_event(session, job_id, f"Step {step}", type="metrics", data=data,
                      dedupe_key=f"metrics:{step}")  # fmt: skip
        add_event(session, job_id, "Step 3", type="metrics", dedupe_key="metrics:3",
                  data={"step": 3, "loss": 0.5, "val_loss": 0.7, "val_token_accuracy": 0.9})  # fmt: skip
        session.add(
            Checkpoint(id=new_id("ftckpt"), job_id=job_id, step=3, path="/c/3",
                       metrics={"step": 3.0, "loss": 0.5, "token_accuracy": 0.8, "val_loss": 0.7,
                                "val_token_accuracy": 0.9})
        )  # fmt: skip
        job.estimated_finish = datetime(2030, 1, 1, tzinfo=UTC)
    sdk = openai.OpenAI(base_url=f"{api.url}/v1", api_key=BOOTSTRAP_KEY, max_retries=0)
    assert sdk.fine_tuning.jobs.retrieve(job_id).estimated_finish == 1893456000

    (ckpt,) = sdk.fine_tuning.jobs.checkpoints.list(job_id).data
    assert ckpt.metrics.train_loss == 0.5 and ckpt.metrics.train_mean_token_accuracy == 0.8
    assert ckpt.metrics.valid_loss == ckpt.metrics.full_valid_loss == 0.7
    assert ckpt.metrics.full_valid_mean_token_accuracy == 0.9 and ckpt.metrics.step == 3
    raw = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"][0]
    assert raw["metrics"]["loss"] == 0.5  # ours stay beside OpenAI's

    with sessions.begin() as session:
        row = session.query(Job).filter_by(id=job_id).one()
        row.result_files = [write_result_file(session, row, api.settings.files_dir).id]
        row.status = JobStatus.SUCCEEDED.value
    job_obj = sdk.fine_tuning.jobs.retrieve(job_id)
    assert job_obj.estimated_finish is None  # only while running
    (file_id,) = job_obj.result_files
    meta = sdk.files.retrieve(file_id)
    assert meta.purpose == "fine-tune-results" and meta.filename.endswith(".csv")
    table = list(csv.DictReader(io.StringIO(sdk.files.content(file_id).text)))
    assert [r["step"] for r in table] == ["1", "2", "3"]
    assert table[0]["train_loss"] == "2.0" and table[1]["train_accuracy"] == "0.8"
    assert table[2]["valid_loss"] == "0.7" and table[0]["valid_loss"] == ""
    other = api.keyed(api.new_key("other-project"))
    assert_error(other.get(f"/v1/files/{file_id}/content"), 404)


def test_auto_hyperparameters_resolve_from_the_dataset_size_and_show_on_the_job(
    api: Api,
) -> None:
    from tests.platform.data import S1K, jsonl
    from tests.platform.test_api_files import upload
    from tests.platform.test_api_jobs import reconcile

    file_id = upload(api, jsonl(*[S1K] * 12)).json()["id"]
    sdk = openai.OpenAI(base_url=f"{api.url}/v1", api_key=BOOTSTRAP_KEY, max_retries=0)
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    job = sdk.fine_tuning.jobs.create(
        model="thinkforge/tiny", training_file=file_id,
        method={"type": "supervised", "supervised": {"hyperparameters": auto}},  # type: ignore[typeddict-item]
    )  # fmt: skip
    assert job.status == "validating_files"
    assert job.method.supervised.hyperparameters.n_epochs == "auto"  # type: ignore[union-attr]
    reconcile(api)
    job = sdk.fine_tuning.jobs.retrieve(job.id)
    hyper = job.method.supervised.hyperparameters  # type: ignore[union-attr]
    # 12 records, defaults 5 epochs x batch 16 at lr 1e-5: >= 100 examples seen -> 9
    # epochs; >= 4 steps an epoch -> batch 3; lr scaled by sqrt(3 / 16)
    assert (hyper.n_epochs, hyper.batch_size) == (9, 3)
    assert abs(hyper.learning_rate_multiplier - (3 / 16) ** 0.5) < 1e-9
    raw = api.client.get(f"/v1/fine_tuning/jobs/{job.id}").json()
    assert raw["hyperparameters"] == raw["method"]["supervised"]["hyperparameters"]
    trained = raw["config"]["hyperparameters"]
    assert (trained["n_epochs"], trained["batch_size"]) == (9, 3)
    assert abs(trained["learning_rate"] - 1e-5 * (3 / 16) ** 0.5) < 1e-15

    fixed = sdk.fine_tuning.jobs.create(
        model="thinkforge/tiny", training_file=file_id,
        hyperparameters={"learning_rate_multiplier": 2.0, "n_epochs": 2},
    )  # fmt: skip
    reconcile(api)
    raw = api.client.get(f"/v1/fine_tuning/jobs/{fixed.id}").json()
    assert raw["config"]["hyperparameters"]["learning_rate"] == 2e-5
    assert raw["hyperparameters"]["learning_rate_multiplier"] == 2.0
    both = api.client.post("/v1/fine_tuning/jobs", json={
        "model": "thinkforge/tiny", "training_file": file_id,
        "hyperparameters": {"learning_rate_multiplier": 2.0, "learning_rate": 1e-4},
    })  # fmt: skip
    assert_error(both, 400, "hyperparameters.learning_rate_multiplier")
