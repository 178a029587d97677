"""Distillation API (fake launcher and Serve; the run's outputs made by the real job code
against an in-repo fake teacher): bad input refused with nothing written, the secret key
never shown, the lifecycle from queued to a training file with events, a failed teacher's
partial traces, and the distillation in the registry lineage of a model trained on it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.conftest import LiveServer
from tests.jobs.fake_teacher import FakeTeacher
from tests.jobs.test_distill import sequential
from tests.platform.conftest import BOOTSTRAP_KEY, Api, make_settings
from tests.platform.data import jsonl, parquet
from tests.platform.fakes import FakeLauncher, FakeServe
from tests.platform.test_api_files import assert_error, upload
from tests.platform.test_registry_mlflow import NAME
from thinkforge.jobs.config import DistillConfig
from thinkforge.jobs.distill import EVENTS_FILE, EventLog, TeacherFailed, run_distill
from thinkforge.platform.app import create_app
from thinkforge.platform.distill import reconcile_distills
from thinkforge.platform.launcher import LaunchState
from thinkforge.platform.models import Distillation

SECRET = "sk-very-secret-teacher-key-0123456789"
QUESTIONS = [
    {"question": "Sum: 1 2 3", "answer": "6"},
    {"question": "Sum: 4 [wrong]", "answer": "4"},
    {"question": "Sum: 2 2 2 2", "solution": "\\boxed{8}"},
]


def questions(api: Api, rows: list[dict[str, Any]] = QUESTIONS) -> str:
    resp = upload(api, jsonl(*rows), name="q.jsonl", purpose="distill")
    assert resp.status_code == 200, resp.text
    assert resp.json()["purpose"] == "distill" and resp.json()["format"] == "questions"
    return str(resp.json()["id"])


def deploy(api: Api, client: Any = None, name: str = "teacher") -> None:
    resp = (client or api.client).post("/v1/deployments", json={"name": name, "model": f"{NAME}/1"})
    assert resp.status_code == 200, resp.text


def reconcile(api: Api) -> None:
    ctx = api.app.state.ctx  # type: ignore[attr-defined]
    reconcile_distills(ctx.sessions, ctx.launcher, ctx.settings)


def count_rows(api: Api) -> int:
    with api.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
        return int(session.scalar(select(func.count()).select_from(Distillation)) or 0)


def test_question_file_without_reference_answers_is_refused_naming_the_row(api: Api) -> None:
    bad = jsonl({"question": "Sum: 1", "answer": "1"}, {"question": "Sum: 2 2"})
    err = assert_error(upload(api, bad, name="q.jsonl", purpose="distill"), 400, "answer")
    assert "line 2" in err["message"] and "reference answer" in err["message"]
    table = parquet({"question": "Sum: 1", "solution": "1"}, {"question": "Sum: 3"})
    err = assert_error(upload(api, table, name="q.parquet", purpose="distill"), 400, "answer")
    assert "row 2" in err["message"]
    assert api.client.get("/v1/files").json()["data"] == []
    # A parquet pool with its answers is taken.
    ok = upload(api, parquet({"question": "Sum: 3", "answer": 3}), name="q.parquet",
                purpose="distill")  # fmt: skip
    assert ok.status_code == 200 and ok.json()["num_records"] == 1


def test_bad_teachers_are_refused_and_write_nothing(api: Api, versions: list[str]) -> None:
    file_id = questions(api)
    other = api.keyed(api.new_key("other"))
    deploy(api, other, name="theirs")
    resp = api.client.post("/v1/datasets/distill",
                           json={"question_file": file_id, "teacher": {"deployment": "theirs"}})  # fmt: skip
    assert_error(resp, 404, "teacher.deployment")
    for url in ("http://169.254.169.254/latest/v1", "http://127.0.0.1:8000/v1", "file:///etc"):
        resp = api.client.post(
            "/v1/datasets/distill",
            json={"question_file": file_id, "teacher": {"base_url": url, "model": "m"}},
        )
        assert assert_error(resp, 400, "teacher.base_url")["code"] == "url_not_allowed"
    training = upload(api, jsonl({"question": "q", "solution": "s", "answer": "a"})).json()["id"]
    resp = api.client.post("/v1/datasets/distill",
                           json={"question_file": training, "teacher": {"deployment": "x"}})  # fmt: skip
    assert "purpose=distill" in assert_error(resp, 400, "question_file")["message"]
    resp = api.client.post("/v1/datasets/distill", json={
        "question_file": file_id, "teacher": {"deployment": "x", "version": f"{NAME}/1"}})  # fmt: skip
    assert_error(resp, 400)
    resp = api.client.post("/v1/datasets/distill", json={
        "question_file": file_id, "teacher": {"version": f"{NAME}/1"},
        "curation": {"weaker": {"deployment": "theirs"}}})  # fmt: skip
    assert_error(resp, 404, "curation.weaker.deployment")
    assert count_rows(api) == 0 and api.launcher.submissions == []


@pytest.fixture
def external_api(tmp_path: Path, database_url: str) -> Iterator[Api]:
    """An API whose settings allow one external teacher URL and hold its key."""
    import httpx

    settings = make_settings(
        tmp_path, database_url, distill_teacher_urls=["https://teacher.example.com/v1"],
        distill_teacher_secrets={"example": SECRET},
    )  # fmt: skip
    launcher = FakeLauncher()
    app = create_app(settings, launcher=launcher, serve=FakeServe())
    with (
        LiveServer(app) as server,
        httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {BOOTSTRAP_KEY}"},
                     timeout=30) as client,
    ):  # fmt: skip
        yield Api(server.url, client, settings, launcher, app)


def test_external_teacher_key_is_a_reference_never_echoed(external_api: Api) -> None:
    api = external_api
    file_id = questions(api)
    body = {"question_file": file_id, "teacher": {
        "base_url": "https://teacher.example.com/v1/", "model": "big", "api_key_secret": "nope"}}  # fmt: skip
    assert_error(api.client.post("/v1/datasets/distill", json=body), 400, "teacher.api_key_secret")
    lookalike = {**body["teacher"], "base_url": "https://teacher.example.com.evil.io/v1"}
    resp = api.client.post("/v1/datasets/distill", json={**body, "teacher": lookalike})
    assert_error(resp, 400, "teacher.base_url")
    body["teacher"]["api_key_secret"] = "example"
    resp = api.client.post("/v1/datasets/distill", json=body)
    assert resp.status_code == 200, resp.text
    made = resp.json()
    assert made["teacher"] == {"base_url": "https://teacher.example.com/v1", "model": "big",
                               "api_key_secret": "example"}  # fmt: skip
    reconcile(api)
    (spec,) = api.launcher.submissions
    assert spec.module == "thinkforge.jobs.distill"
    assert spec.env["THINKFORGE_TEACHER_API_KEY"] == SECRET  # the run's environment only
    assert SECRET not in " ".join(spec.args)
    for text in (resp.text, api.client.get(f"/v1/datasets/distill/{made['id']}").text,
                 api.client.get("/v1/datasets/distill").text):  # fmt: skip
        assert SECRET not in text


def produce(api: Api, row: dict[str, Any], fake: FakeTeacher) -> None:
    """Run the job's own code as the Ray job would, its teacher the fake."""
    with api.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
        stored = session.scalar(select(Distillation).where(Distillation.id == row["id"]))
        assert stored is not None
        config = DistillConfig.model_validate(stored.config)
        out = Path(stored.output_dir)
    config.teacher.base_url = fake.base_url  # the front door stands in for the deployment
    run_distill(config, out, EventLog(out / EVENTS_FILE, row["id"]), generate=sequential)


def test_distillation_lifecycle_to_a_training_file(api: Api, versions: list[str]) -> None:
    deploy(api)
    file_id = questions(api)
    body = {"question_file": file_id, "teacher": {"deployment": "teacher"}, "samples": 2,
            "thinking": {"max_tokens": 64}, "seed": 5,
            "curation": {"min_correct": 1, "max_examples": 10}}  # fmt: skip
    resp = api.client.post("/v1/datasets/distill", json=body, headers={"Idempotency-Key": "d1"})
    assert resp.status_code == 200, resp.text
    made = resp.json()
    again = api.client.post("/v1/datasets/distill", json=body, headers={"Idempotency-Key": "d1"})
    assert again.json()["id"] == made["id"] and count_rows(api) == 1
    assert made["status"] == "queued" and made["object"] == "distillation"
    assert made["teacher"] == {"deployment": "teacher", "model_version": f"{NAME}/1"}
    assert made["samples"] == 2 and made["thinking"] == {"max_tokens": 64} and made["seed"] == 5
    assert "distillation" in assert_error(api.client.delete(f"/v1/files/{file_id}"), 409)["message"]
    reconcile(api)
    (spec,) = api.launcher.submissions
    key = spec.env["THINKFORGE_API_KEY"]  # the run's own front-door key
    assert key not in str(made) and key not in " ".join(spec.args)
    api.launcher.set(made["id"], LaunchState.RUNNING)
    with FakeTeacher() as fake:
        produce(api, made, fake)
    reconcile(api)
    running = api.client.get(f"/v1/datasets/distill/{made['id']}").json()
    assert running["status"] == "running"
    api.launcher.set(made["id"], LaunchState.SUCCEEDED)
    reconcile(api)
    done = api.client.get(f"/v1/datasets/distill/{made['id']}").json()
    assert done["status"] == "succeeded", done
    assert done["counts"] == {"questions": 3, "traces": 6, "correct_traces": 4, "kept": 2}
    assert done["stages"]["correctness"]["dropped"] == 1
    out = api.client.get(f"/v1/files/{done['output_file']}").json()
    assert out["purpose"] == "fine-tune" and out["format"] == "s1k" and out["num_records"] == 2
    traces = api.client.get(f"/v1/files/{done['traces_file']}").json()
    assert traces["purpose"] == "distill-traces" and traces["num_records"] == 6
    rows = [json.loads(x) for x in
            api.client.get(f"/v1/files/{done['output_file']}/content").text.splitlines()]  # fmt: skip
    assert rows[0]["question"] == "Sum: 2 2 2 2" and rows[0]["attempt"] == "Answer: 8"
    events = api.client.get(f"/v1/datasets/distill/{made['id']}/events?limit=100").json()["data"]
    types = [e["type"] for e in reversed(events)]
    assert types[0] == "started" and types[-1] == "finished" and types.count("stage") == 4
    reconcile(api)  # copied once, however often the reconciler looks
    assert len(api.client.get(f"/v1/datasets/distill/{made['id']}/events?limit=100")
               .json()["data"]) == len(events)  # fmt: skip
    with api.keyed(key) as run_key:  # the run has ended: its key with it
        assert run_key.get("/v1/deployments").status_code == 401
    job = api.client.post("/v1/fine_tuning/jobs", json={
        "model": "thinkforge/tiny", "training_file": done["output_file"], "recipe": "tiny-cpu"})  # fmt: skip
    assert job.status_code == 200, job.text
    check_lineage(api, done, out["sha256"])


def check_lineage(api: Api, done: dict[str, Any], sha256: str) -> None:
    """A version trained on the curated file shows the distillation in its lineage."""
    from tests.platform.test_registry_mlflow import make_model_dir
    from thinkforge.jobs.config import SFTConfig
    from thinkforge.jobs.tracking import open_job_run, register_model

    uri = api.settings.mlflow_tracking_uri
    run_id = open_job_run(
        tracking_uri=uri, job_id="ftjob-distilled",
        config=SFTConfig(model="thinkforge/tiny", dataset="x.jsonl"), dataset_sha256=sha256,
        artifact_root=api.settings.mlflow_artifact_root,
    )  # fmt: skip
    version = register_model(
        tracking_uri=uri, run_id=run_id, name=NAME, job_id="ftjob-distilled",
        model_dir=make_model_dir(api.settings.data_dir / "m", seed="d"),
        base_model="thinkforge/tiny", dataset_sha256=sha256,
    )  # fmt: skip
    number = version.rpartition("/")[2]
    lineage = api.client.get(f"/v1/registry/models/{NAME}/versions/{number}").json()["lineage"]
    assert lineage["dataset_sha256"] == sha256 and lineage["distill_id"] == done["id"]
    assert json.loads(lineage["distill_teacher"])["deployment"] == "teacher"
    assert lineage["distill_seed"] == "5"
    assert json.loads(lineage["distill_counts"])["kept"] == 2
    assert json.loads(lineage["distill_filters"])["min_correct"] == 1
    other = api.keyed(api.new_key("elsewhere"))  # another project sees no such lineage
    seen = other.get(f"/v1/registry/models/{NAME}/versions/{number}").json()
    assert "distill_id" not in (seen.get("lineage") or {})


def test_teacher_failing_mid_run_fails_with_its_partial_traces(
    api: Api, versions: list[str]
) -> None:
    deploy(api)
    rows = [{"question": f"Sum: {i} 1", "answer": str(i + 1)} for i in range(4)]
    resp = api.client.post("/v1/datasets/distill", json={
        "question_file": questions(api, rows), "teacher": {"deployment": "teacher"},
        "max_retries": 1})  # fmt: skip
    made = resp.json()
    reconcile(api)
    with FakeTeacher(fail_after=2) as fake, pytest.raises(TeacherFailed):
        produce(api, made, fake)
    api.launcher.set(made["id"], LaunchState.FAILED, "the teacher failed after 2 tries")
    reconcile(api)
    done = api.client.get(f"/v1/datasets/distill/{made['id']}").json()
    assert done["status"] == "failed" and done["error"]["code"] == "teacher_failed"
    assert done["output_file"] is None and done["counts"] == {"traces": 2}
    partial = api.client.get(f"/v1/files/{done['traces_file']}").json()
    assert partial["num_records"] == 2
    events = api.client.get(f"/v1/datasets/distill/{made['id']}/events").json()["data"]
    assert events[0]["type"] == "teacher_failed" and events[0]["data"]["done"] == 2
    assert "2 of 4" in events[0]["message"]


def test_cancel_before_and_after_launch(api: Api, versions: list[str]) -> None:
    deploy(api)
    file_id = questions(api)
    body = {"question_file": file_id, "teacher": {"version": f"{NAME}@nope"}}
    assert_error(api.client.post("/v1/datasets/distill", json=body), 404)
    body["teacher"] = {"version": f"{NAME}/2"}
    first = api.client.post("/v1/datasets/distill", json=body).json()
    assert first["teacher"] == {"version": f"{NAME}/2"}
    # Cancelled at once, or (if the create's background pass launched it) through cancelling.
    cancelled = api.client.post(f"/v1/datasets/distill/{first['id']}/cancel").json()
    assert cancelled["status"] in ("cancelled", "cancelling")
    second = api.client.post("/v1/datasets/distill", json=body).json()
    reconcile(api)
    (spec,) = [s for s in api.launcher.submissions if s.job_id == second["id"]]
    assert "THINKFORGE_API_KEY" not in spec.env  # a version is loaded by the run itself
    assert json.loads(spec.args[spec.args.index("--config-json") + 1])["teacher"]["model_uri"] \
        == f"models:/{NAME}/2"  # fmt: skip
    cancelling = api.client.post(f"/v1/datasets/distill/{second['id']}/cancel").json()
    assert cancelling["status"] == "cancelling" and second["id"] in api.launcher.cancelled
    reconcile(api)
    assert api.client.get(f"/v1/datasets/distill/{first['id']}").json()["status"] == "cancelled"
    assert api.client.get(f"/v1/datasets/distill/{second['id']}").json()["status"] == "cancelled"
    assert_error(api.client.post(f"/v1/datasets/distill/{second['id']}/cancel"), 409)
    listed = api.client.get("/v1/datasets/distill").json()["data"]
    assert [d["id"] for d in listed] == [second["id"], first["id"]]


def test_distill_command_uploads_waits_and_prints_the_training_file(
    api: Api, versions: list[str], tmp_path: Path
) -> None:
    import threading
    import time

    from typer.testing import CliRunner

    from thinkforge.cli import app

    deploy(api)
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(jsonl(*QUESTIONS))

    def run_when_created() -> None:
        deadline = time.monotonic() + 30
        while not (listed := api.client.get("/v1/datasets/distill").json()["data"]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        reconcile(api)
        with FakeTeacher() as fake:
            produce(api, listed[0], fake)
        api.launcher.set(listed[0]["id"], LaunchState.SUCCEEDED)
        reconcile(api)

    helper = threading.Thread(target=run_when_created)
    helper.start()
    env = {"THINKFORGE_API_URL": api.url, "THINKFORGE_API_KEY": BOOTSTRAP_KEY, "COLUMNS": "200"}
    result = CliRunner().invoke(
        app, ["distill", str(pool), "--teacher", "teacher", "--samples", "2",
              "--max-thinking", "64", "--max-examples", "1"], env=env,
    )  # fmt: skip
    helper.join()
    assert result.exit_code == 0, result.output
    (made,) = api.client.get("/v1/datasets/distill").json()["data"]
    assert made["curation"]["max_examples"] == 1 and made["thinking"] == {"max_tokens": 64}
    assert f"training file: {made['output_file']}" in result.stdout
    assert made["counts"]["kept"] == 1 and "diversity" in result.stdout
