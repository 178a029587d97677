"""Pause and resume over real HTTP (the official ``openai`` SDK's ``pause``/``resume`` too),
with the fake launcher and a scripted checkpoint reading; a real run pauses and resumes in
``tests/integration/test_training_e2e.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.platform.conftest import BOOTSTRAP_KEY, Api
from tests.platform.data import S1K, jsonl
from tests.platform.test_api_files import assert_error, upload
from tests.platform.test_api_jobs import create
from thinkforge.jobs.checkpoints import PAUSE_FILE, CheckpointInfo, pause_requested
from thinkforge.platform.launcher import LaunchState
from thinkforge.platform.reconciler import reconcile_once
from thinkforge.platform.status import JobStatus


@dataclass
class ScriptedProgress:
    final: bool
    checkpoints: list[CheckpointInfo] = field(default_factory=list)


class ScriptedTracker:
    """What the checkpoint store says, set by the test (the real one reads it)."""

    def __init__(self) -> None:
        self.checkpoints: list[CheckpointInfo] = []

    def fetch(self, job: Any, *, final: bool) -> ScriptedProgress:
        return ScriptedProgress(final, list(self.checkpoints))

    def apply(self, session: Any, job: Any, progress: Any) -> None:
        pass


def reconcile(api: Api, tracker: ScriptedTracker) -> None:
    ctx = api.app.state.ctx  # type: ignore[attr-defined]
    reconcile_once(ctx.sessions, ctx.launcher, tracker)


def status(api: Api, job_id: str) -> str:
    return str(api.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"])


@pytest.fixture
def sdk(api: Api) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=BOOTSTRAP_KEY, max_retries=0)


def running_job(api: Api, tracker: ScriptedTracker) -> str:
    file_id = upload(api, jsonl(S1K, S1K)).json()["id"]
    job_id = str(create(api, file_id).json()["id"])
    reconcile(api, tracker)
    api.launcher.set(job_id, LaunchState.RUNNING)
    reconcile(api, tracker)
    assert status(api, job_id) == "running"
    return job_id


def test_pause_resume_with_the_openai_sdk(api: Api, sdk: openai.OpenAI) -> None:
    tracker = ScriptedTracker()
    job_id = running_job(api, tracker)
    storage = api.settings.storage_path

    paused = sdk.fine_tuning.jobs.pause(job_id)
    assert paused.id == job_id and paused.status == "pausing"
    assert pause_requested(storage, job_id)
    assert sdk.fine_tuning.jobs.pause(job_id).status == "pausing"  # a repeat changes nothing
    with pytest.raises(openai.ConflictError):
        sdk.fine_tuning.jobs.resume(job_id)  # not paused yet

    # The run checkpoints at step 2 of 6 and ends: paused.
    tracker.checkpoints = [CheckpointInfo(2, 0.3, "/ckpt/2", {"step": 2.0, "total_steps": 6.0})]
    api.launcher.set(job_id, LaunchState.SUCCEEDED)
    reconcile(api, tracker)
    assert status(api, job_id) == "paused"
    reconcile(api, tracker)  # nothing runs: passes leave it alone
    assert status(api, job_id) == "paused"

    resumed = sdk.fine_tuning.jobs.resume(job_id)
    assert resumed.status == "queued"
    assert not pause_requested(storage, job_id)
    reconcile(api, tracker)
    submissions = [s.submission_id for s in api.launcher.submissions]
    assert submissions == [job_id, f"{job_id}-resume-1"]
    assert api.launcher.submissions[1].job_id == job_id  # same checkpoints: resumes there
    api.launcher.set(f"{job_id}-resume-1", LaunchState.RUNNING)
    reconcile(api, tracker)
    assert status(api, job_id) == "running"

    events = [e.message for e in sdk.fine_tuning.jobs.list_events(job_id, limit=50).data]
    assert any("paused at step 2 of 6" in m for m in events)
    assert any("resumed from its checkpoint at step" in m or "resumed" in m for m in events)
    assert sum(1 for m in events if m == "Training started") == 2

    # Cancel stops the resumed run, not the first one.
    assert sdk.fine_tuning.jobs.cancel(job_id).status == "cancelling"
    assert api.launcher.cancelled == [f"{job_id}-resume-1"]


def test_a_pausing_job_that_finished_first_succeeded(api: Api) -> None:
    tracker = ScriptedTracker()
    job_id = running_job(api, tracker)
    assert api.client.post(f"/v1/fine_tuning/jobs/{job_id}/pause").status_code == 200
    api.launcher.set(job_id, LaunchState.SUCCEEDED)
    reconcile(api, tracker)  # no checkpoint read yet: the next pass decides
    assert status(api, job_id) == "pausing"
    tracker.checkpoints = [CheckpointInfo(6, 1.0, "/ckpt/6", {"step": 6.0, "total_steps": 6.0})]
    reconcile(api, tracker)
    assert status(api, job_id) == "succeeded"


def test_pause_and_resume_rules(api: Api, tmp_path: Any) -> None:
    file_id = upload(api, jsonl(S1K)).json()["id"]
    queued = create(api, file_id).json()["id"]
    err = assert_error(api.client.post(f"/v1/fine_tuning/jobs/{queued}/pause"), 409)
    assert "only a running job can be paused" in err["message"]
    err = assert_error(api.client.post(f"/v1/fine_tuning/jobs/{queued}/resume"), 409)
    assert "only a paused job can be resumed" in err["message"]
    assert not (Path(api.settings.storage_path) / queued / PAUSE_FILE).exists()
    assert_error(api.client.post("/v1/fine_tuning/jobs/ftjob-nope/pause"), 404)
    other = api.keyed(api.new_key("other-project"))
    assert_error(other.post(f"/v1/fine_tuning/jobs/{queued}/pause"), 404)
    assert_error(other.post(f"/v1/fine_tuning/jobs/{queued}/resume"), 404)


def test_a_paused_job_is_cancelled_at_once(api: Api) -> None:
    tracker = ScriptedTracker()
    job_id = running_job(api, tracker)
    api.client.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    tracker.checkpoints = [CheckpointInfo(1, 0.1, "/ckpt/1", {"step": 1.0, "total_steps": 6.0})]
    api.launcher.set(job_id, LaunchState.SUCCEEDED)
    reconcile(api, tracker)
    cancelled = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled" and api.launcher.cancelled == []


def test_warm_start_from_a_job_checkpoint_of_the_project(api: Api, tmp_path: Path) -> None:
    from tests.platform.conftest import add_job
    from thinkforge.platform.models import Checkpoint, new_id

    sessions = api.app.state.ctx.sessions  # type: ignore[attr-defined]
    with sessions.begin() as session:
        parent = add_job(
            session, status=JobStatus.SUCCEEDED, config={"registered_model_name": "sums"}
        )
        session.add(Checkpoint(id=new_id("ftckpt"), job_id=parent.id, step=2,
                               path=str(tmp_path / "ckpt-2"), metrics={}))  # fmt: skip
        parent_id = parent.id
    file_id = upload(api, jsonl(S1K)).json()["id"]
    ref = f"{parent_id}:ckpt-step-2"
    resp = create(api, file_id, model=ref)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["model"] == ref and job["config"]["model"] == str(tmp_path / "ckpt-2")
    assert job["config"]["registered_model_name"] is None
    events = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert any(e["message"] == f"Warm start from checkpoint {ref}" for e in events)
    from sqlalchemy import select

    from thinkforge.platform.models import RegisteredModelOwner as ModelName

    with sessions() as session:  # a new version of the parent's model
        names = set(session.scalars(select(ModelName.name)))
    assert "sums" in names

    err = assert_error(create(api, file_id, model=f"{parent_id}:ckpt-step-3"), 404, "model")
    assert "no checkpoint at step 3" in err["message"]
    other = api.keyed(api.new_key("other-project"))
    other_file = other.post(
        "/v1/files", files={"file": ("t.jsonl", jsonl(S1K))}, data={"purpose": "fine-tune"}
    ).json()["id"]
    body = {"model": ref, "training_file": other_file}
    assert_error(other.post("/v1/fine_tuning/jobs", json=body), 404, "model")
    assert other.get("/v1/fine_tuning/jobs").json()["data"] == []
