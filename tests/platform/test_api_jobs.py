"""Fine-tuning jobs API over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from tests.platform.conftest import Api
from tests.platform.data import S1K, jsonl
from tests.platform.test_api_files import assert_error, upload
from thinkforge.platform.launcher import CannotFit, LaunchState, LaunchStatus
from thinkforge.platform.models import Checkpoint, File
from thinkforge.platform.reconciler import reconcile_once


@pytest.fixture
def file_id(api: Api) -> str:
    return str(upload(api, jsonl(S1K, S1K)).json()["id"])


def create(api: Api, file_id: str, **fields: object) -> httpx.Response:
    body = {"model": "thinkforge/tiny", "training_file": file_id, **fields}
    return api.client.post("/v1/fine_tuning/jobs", json=body)


def reconcile(api: Api) -> None:
    ctx = api.app.state.ctx  # type: ignore[attr-defined]
    reconcile_once(ctx.sessions, ctx.launcher)


def validated(api: Api, job_id: str, timeout_s: float = 30) -> None:
    """Wait for the create's background task to validate the training file: until then a
    reconcile pass has nothing to submit (the cause of this module's flaky failures under
    load, where the pass ran first and the job was read back ``queued``)."""
    deadline = time.monotonic() + timeout_s
    while api.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "validating_files":
        assert time.monotonic() < deadline, f"job {job_id} still validating its file"
        time.sleep(0.05)


def test_create_get_and_defaults(api: Api, file_id: str) -> None:
    resp = create(api, file_id, suffix="math", metadata={"team": "nlp"}, seed=7)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] in ("validating_files", "queued")
    assert job["finished_at"] is None and job["seed"] == 7
    hp = job["method"]["supervised"]["hyperparameters"]
    assert (hp["learning_rate"], hp["n_epochs"], hp["batch_size"]) == (1e-5, 5, 16)
    assert (hp["adam_beta1"], hp["adam_beta2"], hp["weight_decay"]) == (0.9, 0.95, 1e-4)
    assert job["config"]["registered_model_name"] == "math"
    reconcile(api)
    got = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert got["status"] == "queued"
    assert [s.job_id for s in api.launcher.submissions] == [job["id"]]
    events = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()
    messages = [e["message"] for e in events["data"]]
    assert any("queued" in m for m in messages) and any("Validating" in m for m in messages)


def test_validation_file_reaches_the_training_config(api: Api, file_id: str) -> None:
    held_out = upload(api, jsonl(S1K)).json()
    resp = create(api, file_id, validation_file=held_out["id"])
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["validation_file"] == held_out["id"]
    with api.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
        paths = {fid: path for fid, path in session.execute(select(File.id, File.path))}
    assert job["config"]["dataset"] == paths[file_id]
    assert job["config"]["validation_dataset"] == paths[held_out["id"]]  # the job evaluates it
    assert_error(create(api, file_id, validation_file="file-nope"), 400, "validation_file")


def test_lifecycle_to_succeeded_and_terminal_is_final(api: Api, file_id: str) -> None:
    job_id = create(api, file_id).json()["id"]
    reconcile(api)
    api.launcher.set(job_id, LaunchState.RUNNING)
    reconcile(api)
    running = api.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert running["status"] == "running" and running["started_at"] is not None
    api.launcher.set(job_id, LaunchState.SUCCEEDED)
    reconcile(api)
    done = api.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert done["status"] == "succeeded" and done["finished_at"] is not None
    api.launcher.set(job_id, LaunchState.FAILED, "late failure")
    reconcile(api)
    assert api.client.get(f"/v1/fine_tuning/jobs/{job_id}").json() == done
    assert_error(api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel"), 409)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("worker OOM", "training_failed"),
        (  # what the entrypoint says when DCP state cannot be resumed (jobs.checkpointing)
            "training failed: [checkpoint_incompatible] checkpoint_00000004 was written with "
            "global_batch 16, this job has 32",
            "checkpoint_incompatible",
        ),
        (  # a hub or registry base with experts thinkforge cannot route (jobs.__main__)
            "[invalid_model] base model 'mistralai/Mixtral-8x7B-v0.1': model type 'mixtral' "
            "is a mixture of experts whose router thinkforge does not know",
            "invalid_model",
        ),
    ],
)
def test_failed_run_records_error(api: Api, file_id: str, message: str, code: str) -> None:
    job_id = create(api, file_id).json()["id"]
    reconcile(api)
    api.launcher.set(job_id, LaunchState.FAILED, message)
    reconcile(api)
    job = api.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["finished_at"] is not None
    assert job["error"]["code"] == code and message in job["error"]["message"]


def test_failed_run_keeps_the_error_short_and_its_log_in_an_error_event(
    api: Api, file_id: str
) -> None:
    job_id = create(api, file_id).json()["id"]
    reconcile(api)
    log = "".join(f"  File /srv/app/{i}.py, line {i}\n" for i in range(400))
    log = f"Traceback (most recent call last):\n{log}RuntimeError: worker 1 died\n"
    api.launcher.states[job_id] = LaunchStatus(
        LaunchState.FAILED,
        message="Job entrypoint command failed with exit code 1, last available logs "
        f"(truncated to 20,000 chars):\n{log}",
        log_tail=log[-4000:],
    )
    reconcile(api)
    job = api.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    message = job["error"]["message"]
    assert job["error"]["code"] == "training_failed"
    assert "\n" not in message and len(message) <= 300 and "/srv/app" not in message
    assert "exit code 1" in message and "events" in message  # where the log is
    events = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100})
    (logged,) = [e for e in events.json()["data"] if e["type"] == "log"]
    assert logged["level"] == "error" and logged["data"]["log"] == log[-4000:]
    assert all("/srv/app" not in e["message"] for e in events.json()["data"])
    other = api.new_key("other-project")
    with api.keyed(other) as client:
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}/events").status_code == 404


def test_a_lost_run_is_resubmitted_within_the_jobs_retry_budget(api: Api, file_id: str) -> None:
    assert api.settings.job_max_retries == 2  # the default; this job asks for one
    job_id = create(api, file_id, max_retries=1).json()["id"]
    assert api.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["max_retries"] == 1
    reconcile(api)
    api.launcher.set(job_id, LaunchState.RUNNING)
    reconcile(api)
    with api.app.state.ctx.sessions.begin() as session:  # type: ignore[attr-defined]
        session.add(Checkpoint(id="ftckpt-1", job_id=job_id, step=4, path="/ckpt/4"))
    del api.launcher.states[job_id]  # the cluster forgets the run (its head restarted)
    reconcile(api)
    job = api.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "running" and job["retries"] == 1
    assert [s.job_id for s in api.launcher.submissions] == [job_id, job_id]
    events = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    (retry,) = [e for e in events if e["type"] == "retry"]
    assert retry["level"] == "warning" and retry["data"] == {
        "retry": 1,
        "max_retries": 1,
        "checkpoint_step": 4,
    }
    assert "step 4" in retry["message"]
    del api.launcher.states[job_id]  # lost again: the budget is spent
    reconcile(api)
    job = api.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "job_lost"
    assert "1 retry" in job["error"]["message"] and len(api.launcher.submissions) == 2
    assert_error(create(api, file_id, max_retries=-1), 400, "max_retries")


def test_a_job_waiting_for_workers_stays_queued_and_says_why(api: Api, file_id: str) -> None:
    job_id = create(api, file_id).json()["id"]
    reconcile(api)
    waiting = {"asked": {"workers": 2, "per_worker": {"CPU": 1.0}}, "free": {"CPU": 1.0},
               "total": {"CPU": 2.0}, "held_by": [{"holder": "Serve deployment d", "resources": {"CPU": 1.0}}]}  # fmt: skip
    api.launcher.states[job_id] = LaunchStatus(
        LaunchState.PENDING, message="Waiting for workers: ...", waiting=waiting
    )
    reconcile(api)
    reconcile(api)
    assert api.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "queued"
    events = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    (event,) = [e for e in events if e["type"] == "waiting"]  # once, however often asked
    assert event["data"] == waiting and event["level"] == "warning"


def test_a_job_larger_than_the_cluster_fails_at_once(api: Api, file_id: str) -> None:
    api.launcher.fail_submit = CannotFit("the job asks for 3 workers with 1 CPU each")
    job_id = create(api, file_id).json()["id"]
    validated(api, job_id)
    reconcile(api)
    job = api.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"] == {
        "code": "insufficient_resources",
        "message": "the job asks for 3 workers with 1 CPU each",
        "param": "resources",
    }


def test_launch_failure_fails_the_job(api: Api, file_id: str) -> None:
    api.launcher.fail_submit = RuntimeError("cluster unreachable")
    job_id = create(api, file_id).json()["id"]
    validated(api, job_id)
    reconcile(api)
    job = api.client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "launch_failed"


def test_cancel_before_and_after_launch(api: Api, file_id: str) -> None:
    first = create(api, file_id).json()["id"]
    reconcile(api)
    api.launcher.set(first, LaunchState.RUNNING)
    reconcile(api)
    resp = api.client.post(f"/v1/fine_tuning/jobs/{first}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelling"
    assert api.launcher.cancelled == [first]
    reconcile(api)
    job = api.client.get(f"/v1/fine_tuning/jobs/{first}").json()
    assert job["status"] == "cancelled" and job["finished_at"] is not None


def test_pagination_and_metadata_filter(api: Api, file_id: str) -> None:
    ids = [create(api, file_id, metadata={"n": str(i % 2)}).json()["id"] for i in range(5)]
    newest_first = list(reversed(ids))
    page1 = api.client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page1["data"]] == newest_first[:2] and page1["has_more"] is True
    page2 = api.client.get(
        "/v1/fine_tuning/jobs", params={"limit": 2, "after": page1["data"][-1]["id"]}
    ).json()
    assert [j["id"] for j in page2["data"]] == newest_first[2:4] and page2["has_more"] is True
    page3 = api.client.get(
        "/v1/fine_tuning/jobs", params={"limit": 2, "after": page2["data"][-1]["id"]}
    ).json()
    assert [j["id"] for j in page3["data"]] == newest_first[4:] and page3["has_more"] is False
    odd = api.client.get("/v1/fine_tuning/jobs", params={"metadata[n]": "1"}).json()
    assert [j["id"] for j in odd["data"]] == [ids[3], ids[1]]
    assert_error(
        api.client.get("/v1/fine_tuning/jobs", params={"after": "ftjob-nope"}), 400, "after"
    )
    assert_error(api.client.get("/v1/fine_tuning/jobs", params={"limit": 0}), 400, "limit")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"learning_rate": -1}},
                }
            },
            "method.supervised.hyperparameters.learning_rate",
        ),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"bogus": 1}}, "hyperparameters.bogus"),
        ({"resources": {"num_workers": 2, "strategy": "zero3"}}, "resources.strategy"),
        ({"seed": -3}, "seed"),
        ({"suffix": "has space"}, "suffix"),
        ({"config": {"block_size": 1}}, "config.block_size"),
        ({"config": {"format": "limo"}}, "config.format"),
        ({"training_file": "file-doesnotexist"}, "training_file"),
        ({"training_file": "/etc/passwd"}, "training_file"),
        ({"training_file": "relative/path.jsonl"}, "training_file"),
        ({"model": ""}, "model"),
        ({"config": {"moe": {"balance": "global"}}}, "config.moe"),  # thinkforge/tiny is dense
        (
            {"model": "thinkforge/tiny-moe", "config": {"moe": {"aux_loss_coef": -0.1}}},
            "config.moe.aux_loss_coef",
        ),
    ],
)
def test_bad_job_requests_write_nothing(api: Api, file_id: str, fields: dict, param: str) -> None:
    resp = create(api, file_id, **fields)
    assert_error(resp, 400, param)
    assert api.client.get("/v1/fine_tuning/jobs").json()["data"] == []
    assert api.launcher.submissions == []


@pytest.mark.parametrize(
    ("model_config", "code", "param"),
    [
        ({"model_type": "mixtral", "num_local_experts": 8}, "invalid_model", "model"),
        ({"model_type": "qwen2", "hidden_size": 8}, None, "config.moe"),
    ],
)
def test_moe_section_checked_against_a_local_base(
    api: Api, file_id: str, tmp_path: Path, model_config: dict, code: str | None, param: str
) -> None:
    base = api.settings.dataset_roots[0] / "base"  # local models must lie under a root
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps(model_config))
    resp = create(api, file_id, model=str(base), config={"moe": {"balance": "global"}})
    assert_error(resp, 400, param)
    if code is not None:
        assert resp.json()["error"]["code"] == code
    assert api.client.get("/v1/fine_tuning/jobs").json()["data"] == []


@pytest.mark.parametrize("strategy", ["fsdp", "auto"])
def test_fsdp_and_auto_are_accepted_on_cpu_workers(api: Api, file_id: str, strategy: str) -> None:
    """FSDP2 runs on CPU over gloo, so a CPU job may ask for it (or for auto)."""
    resp = create(api, file_id, resources={"num_workers": 2, "strategy": strategy})
    assert resp.status_code == 200, resp.text


def test_dataset_uri_under_allowed_root(api: Api) -> None:
    root = api.settings.dataset_roots[0]
    root.mkdir(parents=True)
    (root / "train.jsonl").write_bytes(jsonl(S1K))
    (root / "bad.jsonl").write_bytes(b"not json\n")
    ok = create(api, "", training_file=str(root / "train.jsonl"))
    assert ok.status_code == 200, ok.text
    bad = create(api, "", training_file=f"file://{root / 'bad.jsonl'}").json()
    reconcile(api)
    assert api.client.get(f"/v1/fine_tuning/jobs/{ok.json()['id']}").json()["status"] == "queued"
    failed = api.client.get(f"/v1/fine_tuning/jobs/{bad['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_file"
    assert "line 1" in failed["error"]["message"]
    escape = create(api, "", training_file=str(root / ".." / "datasets-evil" / "x.jsonl"))
    assert_error(escape, 400, "training_file")


def test_auth(api: Api, file_id: str) -> None:
    from thinkforge.platform.auth import create_key

    job_id = create(api, file_id).json()["id"]
    with httpx.Client(base_url=api.url) as anon:
        assert_error(anon.get("/v1/fine_tuning/jobs"), 401)
        assert_error(anon.post("/v1/fine_tuning/jobs", json={}), 401)
        assert anon.get("/healthz").status_code == 200
        assert anon.get("/readyz").status_code == 200
    with api.keyed("tf-wrong") as wrong:
        assert_error(wrong.get("/v1/fine_tuning/jobs"), 401)
    with api.app.state.ctx.sessions.begin() as session:  # type: ignore[attr-defined]
        secret = api.settings.secret_key.get_secret_value()
        other = create_key(session, secret, project_id="other")
        same = create_key(session, secret, project_id="default")
    with api.keyed(other) as client:
        assert_error(client.get(f"/v1/fine_tuning/jobs/{job_id}"), 404)
        assert_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel"), 404)
        assert_error(client.get(f"/v1/fine_tuning/jobs/{job_id}/events"), 404)
        assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
        listed = client.get("/v1/fine_tuning/jobs", params={"after": job_id})
        assert_error(listed, 400, "after")  # another project's id is no cursor
        assert_error(create_with(client, file_id), 400, "training_file")
    with api.keyed(same) as client:
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200


def create_with(client: httpx.Client, file_id: str) -> httpx.Response:
    return client.post("/v1/fine_tuning/jobs", json={"model": "m", "training_file": file_id})


def test_idempotency(api: Api, file_id: str) -> None:
    body = {"model": "thinkforge/tiny", "training_file": file_id}
    first = api.client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "k1"})
    again = api.client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = api.client.post(
        "/v1/fine_tuning/jobs", json={**body, "seed": 1}, headers={"Idempotency-Key": "k1"}
    )
    assert_error(other, 422, "Idempotency-Key")
    rejected = api.client.post(
        "/v1/fine_tuning/jobs", json={**body, "seed": -1}, headers={"Idempotency-Key": "k2"}
    )
    assert_error(rejected, 400)
    fixed = api.client.post(
        "/v1/fine_tuning/jobs", json={**body, "seed": 2}, headers={"Idempotency-Key": "k2"}
    )
    assert fixed.status_code == 200, "a rejected request must not keep its key"
    assert len(api.client.get("/v1/fine_tuning/jobs").json()["data"]) == 2


def test_fifty_concurrent_posts_with_one_key_make_one_job(api: Api, file_id: str) -> None:
    body = {"model": "thinkforge/tiny", "training_file": file_id}

    def post(_: int) -> httpx.Response:
        with api.keyed("tf-bootstrap-key-for-tests-0123456789abcdef") as client:
            return client.post(
                "/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "same"}
            )

    with cf.ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(post, range(50)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 409}, codes
    ids = {r.json()["id"] for r in responses if r.status_code == 200}
    assert len(ids) == 1
    for r in responses:
        if r.status_code == 409:
            assert r.json()["error"]["code"] == "idempotency_in_flight"
    listed = api.client.get("/v1/fine_tuning/jobs").json()["data"]
    assert [j["id"] for j in listed] == list(ids)


def test_a_file_a_live_job_validates_on_cannot_be_deleted(api: Api, file_id: str) -> None:
    held_out = upload(api, jsonl(S1K)).json()["id"]
    job_id = create(api, file_id, validation_file=held_out).json()["id"]
    reconcile(api)
    err = assert_error(api.client.delete(f"/v1/files/{held_out}"), 409, "file_id")
    assert job_id in err["message"]
    assert api.client.get(f"/v1/files/{held_out}").status_code == 200
    api.launcher.set(job_id, LaunchState.SUCCEEDED)
    reconcile(api)
    assert api.client.delete(f"/v1/files/{held_out}").status_code == 200


def _bypasses(api: Api, other_file: str) -> list[tuple[dict, str]]:
    """Job fields that would reach a path the member may not read; each must be a 400."""
    settings = api.settings
    cache = settings.models_dir / "0123456789abcdef"  # a registry download's cache folder
    root = settings.dataset_roots[0]
    return [
        ({"config": {"validation_dataset": "/etc/passwd"}}, "config.validation_dataset"),
        ({"config": {"validation_dataset": other_file}}, "config.validation_dataset"),
        (
            {"config": {"validation_dataset": str(root / "missing.jsonl")}},
            "config.validation_dataset",
        ),
        ({"config": {"dataset": "/etc/passwd"}}, "config.dataset"),
        ({"config": {"model": str(cache)}}, "config.model"),
        ({"config": {"unknown_key": 1}}, "config.unknown_key"),
        ({"model": str(cache)}, "model"),
        ({"model": "/etc"}, "model"),
        ({"model": f"file://{cache}"}, "model"),
        ({"model": str(root / ".." / "models" / "0123456789abcdef")}, "model"),
        ({"model": "Qwen/Qwen2.5-0.5B-Instruct"}, "model"),  # no hub access configured
        ({"model": "relative/dir"}, "model"),
        ({"validation_file": other_file}, "validation_file"),
        ({"training_file": other_file}, "training_file"),
    ]


def test_path_fields_that_bypass_roots_or_tenancy_answer_400_and_write_nothing(
    api: Api, file_id: str
) -> None:
    from thinkforge.platform.models import JobEvent, RegisteredModelOwner

    # Another project's upload, by its path on disk (its id is refused elsewhere).
    other = api.new_key("other")
    with api.keyed(other) as client:
        theirs = client.post(
            "/v1/files", files={"file": ("t.jsonl", jsonl(S1K))}, data={"purpose": "fine-tune"}
        ).json()["id"]
    with api.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
        other_path = session.scalar(select(File.path).where(File.id == theirs))
        claims_before = session.scalar(select(func.count()).select_from(RegisteredModelOwner))
    (api.settings.models_dir / "0123456789abcdef").mkdir(parents=True)
    for fields, param in _bypasses(api, str(other_path)):
        err = assert_error(create(api, file_id, **fields), 400, param)
        if "/etc" in str(fields):  # outside the roots: not a word on whether it exists
            assert "exist" not in err["message"], err
    assert api.client.get("/v1/fine_tuning/jobs").json()["data"] == []
    with api.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
        assert session.scalar(select(func.count()).select_from(JobEvent)) == 0
        claims = session.scalar(select(func.count()).select_from(RegisteredModelOwner))
        assert claims == claims_before
    assert api.launcher.submissions == []


def test_hub_ids_only_when_hub_access_is_configured(tmp_path: Path) -> None:
    from tests.platform.conftest import memory_database
    from thinkforge.platform.errors import InvalidRequest
    from thinkforge.platform.paths import resolve_model
    from thinkforge.platform.settings import Settings

    hub = "Qwen/Qwen2.5-0.5B-Instruct"
    on, off = Settings(data_dir=tmp_path, allow_hub_models=True), Settings(data_dir=tmp_path)
    with memory_database() as sessions, sessions() as session:
        assert resolve_model(session, on, project_id="default", model=hub) == hub
        for settings, model in [(off, hub), (on, "a/../b"), (on, "../a/b"), (on, "a/b/c")]:
            with pytest.raises(InvalidRequest):
                resolve_model(session, settings, project_id="default", model=model)
