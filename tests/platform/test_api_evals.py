"""Evaluations API (fake launcher and Serve): validation, the run's results into the row,
the plot, and the promotion policy that requires a passing evaluation."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.platform.conftest import BOOTSTRAP_KEY, Api
from tests.platform.data import S1K, jsonl
from tests.platform.test_api_files import assert_error, upload
from tests.platform.test_registry_mlflow import NAME
from thinkforge.client import APIError, Client
from thinkforge.platform.evals import reconcile_evals
from thinkforge.platform.launcher import LaunchState

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


def deploy(api: Api, version: int) -> None:
    body = {"name": "sums", "model": f"{NAME}/{version}"}
    assert api.client.post("/v1/deployments", json=body).status_code == 200


def reconcile(api: Api) -> None:
    ctx = api.app.state.ctx  # type: ignore[attr-defined]
    reconcile_evals(ctx.sessions, ctx.launcher, ctx.settings)


def finish(api: Api, eval_id: str, accuracy: float, answered_by: list[int] | None = None) -> None:
    """What the evaluation job leaves behind, then Ray saying it succeeded."""
    out = api.settings.data_dir / "evals" / eval_id
    out.mkdir(parents=True)
    budgets = [{"budget": "full", "accuracy": accuracy, "avg_thinking_tokens": 12.0}]
    results = {"budgets": budgets, "mlflow_run_id": "r1"}
    if answered_by is not None:
        results["model_versions"] = answered_by
    (out / "results.json").write_text(json.dumps(results))
    (out / "plot.png").write_bytes(PNG)
    api.launcher.set(eval_id, LaunchState.SUCCEEDED)
    reconcile(api)


def test_eval_lifecycle_and_plot(api: Api, versions: list[str]) -> None:
    deploy(api, 2)
    file_id = upload(api, jsonl(S1K, S1K)).json()["id"]
    resp = api.client.post(
        "/v1/evals",
        json={
            "deployment": "sums",
            "dataset": file_id,
            "budgets": [{"max_tokens": 4}, {}],
            "limit": 2,
        },
    )
    assert resp.status_code == 200, resp.text
    ev = resp.json()
    assert ev["status"] == "queued" and ev["model_version"] == f"{NAME}/2"
    assert ev["config"]["base_url"] == api.settings.serve_url and ev["config"]["model"] == "sums"
    reconcile(api)
    (spec,) = [s for s in api.launcher.submissions if s.job_id == ev["id"]]
    assert spec.module == "thinkforge.jobs.evaluate" and "--output" in spec.args
    # The run asks the front door with an inference key of its own, given in its
    # environment (never in the config the row and the job's command line show).
    key = spec.env["THINKFORGE_API_KEY"]
    assert key not in str(ev["config"]) and key not in " ".join(spec.args)
    with api.keyed(key) as run_key:
        assert run_key.get("/v1/deployments").json()["error"]["code"] == "inference_key"
    assert_error(api.client.get(f"/v1/evals/{ev['id']}/plot.png"), 409)
    finish(api, ev["id"], 0.75)
    done = api.client.get(f"/v1/evals/{ev['id']}").json()
    assert done["status"] == "succeeded" and done["best_accuracy"] == 0.75
    with api.keyed(key) as run_key:  # the run has ended: its key with it
        assert run_key.get("/v1/deployments").status_code == 401
    assert done["budgets"][0]["budget"] == "full" and done["mlflow_run_id"] == "r1"
    png = api.client.get(done["plot_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == PNG
    with Client(api.url, BOOTSTRAP_KEY) as sdk:
        assert sdk.eval_plot(ev["id"]) == PNG
        with pytest.raises(APIError) as missing:
            sdk.eval_plot("eval-0123")
        assert missing.value.status_code == 404
    assert [e["id"] for e in api.client.get("/v1/evals").json()["data"]] == [ev["id"]]


def test_bad_evals_write_nothing(api: Api, versions: list[str], tmp_path: Path) -> None:
    deploy(api, 1)
    file_id = upload(api, jsonl(S1K)).json()["id"]
    bad = [
        ({"deployment": "nope", "dataset": file_id, "budgets": [{}]}, 404),
        ({"deployment": "sums", "dataset": "file-nope", "budgets": [{}]}, 400),
        ({"deployment": "sums", "dataset": "/etc/passwd", "budgets": [{}]}, 400),
        ({"deployment": "sums", "dataset": file_id, "budgets": []}, 400),
        ({"deployment": "sums", "dataset": file_id, "budgets": [{"max_tokens": -1}]}, 400),
    ]
    for body, status in bad:
        assert_error(api.client.post("/v1/evals", json=body), status)
    assert api.client.get("/v1/evals").json()["data"] == []


def test_promotion_policy_requires_a_passing_eval(api: Api, versions: list[str]) -> None:
    api.settings.promotion_requires_eval = True
    api.settings.promotion_min_accuracy = 0.8
    try:
        put = api.client.put(f"/v1/registry/models/{NAME}/aliases/production", json={"version": 2})
        assert assert_error(put, 409, "version")["code"] == "evaluation_required"
        deploy(api, 2)
        file_id = upload(api, jsonl(S1K)).json()["id"]
        body = {"deployment": "sums", "dataset": file_id, "budgets": [{}]}
        weak = api.client.post("/v1/evals", json=body).json()["id"]
        reconcile(api)
        finish(api, weak, 0.5)
        put = api.client.put(f"/v1/registry/models/{NAME}/aliases/production", json={"version": 2})
        assert assert_error(put, 409, "version")["code"] == "evaluation_required"
        strong = api.client.post("/v1/evals", json=body).json()["id"]
        reconcile(api)
        finish(api, strong, 0.9)
        put = api.client.put(f"/v1/registry/models/{NAME}/aliases/production", json={"version": 2})
        assert put.status_code == 200, put.text
    finally:
        api.settings.promotion_requires_eval = False


def test_an_evaluation_vouches_for_the_version_that_answered(api: Api, versions: list[str]) -> None:
    """The deployment served 2 when the sweep was created; what answered decides."""
    api.settings.promotion_requires_eval = True
    api.settings.promotion_min_accuracy = 0.8
    try:
        deploy(api, 2)
        file_id = upload(api, jsonl(S1K)).json()["id"]
        body = {"deployment": "sums", "dataset": file_id, "budgets": [{}]}
        rolled = api.client.post("/v1/evals", json=body).json()
        assert rolled["model_version"] == f"{NAME}/2"
        reconcile(api)
        finish(api, rolled["id"], 0.9, answered_by=[3])  # rolled to 3 before the sweep ran
        done = api.client.get(f"/v1/evals/{rolled['id']}").json()
        assert done["status"] == "succeeded" and done["model_version"] == f"{NAME}/3"
        put = api.client.put(f"/v1/registry/models/{NAME}/aliases/production", json={"version": 2})
        assert assert_error(put, 409, "version")["code"] == "evaluation_required"

        mixed = api.client.post("/v1/evals", json=body).json()["id"]
        reconcile(api)
        finish(api, mixed, 0.95, answered_by=[2, 3])  # rolled during the sweep
        done = api.client.get(f"/v1/evals/{mixed}").json()
        assert done["status"] == "succeeded" and done["model_version"] is None
        assert done["error"]["code"] == "mixed_versions" and "2, 3" in done["error"]["message"]
        put = api.client.put(f"/v1/registry/models/{NAME}/aliases/production", json={"version": 2})
        assert assert_error(put, 409, "version")["code"] == "evaluation_required"
        put = api.client.put(f"/v1/registry/models/{NAME}/aliases/production", json={"version": 3})
        assert put.status_code == 200, put.text  # the first sweep measured 3 alone
    finally:
        api.settings.promotion_requires_eval = False


def poll(predicate, timeout_s: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_cancel_before_during_and_after_the_launch(api: Api, versions: list[str]) -> None:
    deploy(api, 1)
    body = {"deployment": "sums", "dataset": upload(api, jsonl(S1K)).json()["id"], "budgets": [{}]}
    # Cancelled while its launch is on the way: the run is stopped once it exists.
    api.launcher.gate = threading.Event()
    racing = api.client.post("/v1/evals", json=body).json()["id"]
    assert api.launcher.entered.wait(15), "the reconciler never launched the evaluation"
    cancelled = api.client.post(f"/v1/evals/{racing}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    api.launcher.gate.set()
    poll(lambda: racing in api.launcher.cancelled)
    assert api.client.get(f"/v1/evals/{racing}").json()["status"] == "cancelled"
    api.launcher.gate = None

    running = api.client.post("/v1/evals", json=body).json()["id"]
    reconcile(api)
    api.launcher.set(running, LaunchState.RUNNING)
    reconcile(api)
    assert api.client.get(f"/v1/evals/{running}").json()["status"] == "running"
    stopping = api.client.post(f"/v1/evals/{running}/cancel").json()
    assert stopping["status"] == "cancelling" and running in api.launcher.cancelled
    reconcile(api)  # Ray says stopped
    done = api.client.get(f"/v1/evals/{running}").json()
    assert done["status"] == "cancelled" and done["finished_at"] is not None
    assert_error(api.client.post(f"/v1/evals/{running}/cancel"), 409)
    with api.keyed(api.new_key("other")) as other:
        assert_error(other.post(f"/v1/evals/{running}/cancel"), 404)


def test_create_is_idempotent_and_a_failed_launch_says_why(api: Api, versions: list[str]) -> None:
    deploy(api, 1)
    body = {"deployment": "sums", "dataset": upload(api, jsonl(S1K)).json()["id"], "budgets": [{}]}
    key = {"Idempotency-Key": "sweep-1"}
    first = api.client.post("/v1/evals", json=body, headers=key)
    again = api.client.post("/v1/evals", json=body, headers=key)
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    other = api.client.post("/v1/evals", json={**body, "limit": 1}, headers=key)
    assert_error(other, 422, "Idempotency-Key")
    assert len(api.client.get("/v1/evals").json()["data"]) == 1

    api.launcher.fail_submit = RuntimeError("the Ray dashboard refused the job")
    failed = api.client.post("/v1/evals", json=body).json()["id"]
    reconcile(api)
    row = api.client.get(f"/v1/evals/{failed}").json()
    assert row["status"] == "failed" and row["error"]["code"] == "launch_failed"
    assert "refused the job" in row["error"]["message"] and row["finished_at"] is not None


def test_results_come_from_mlflow_when_the_run_wrote_them_on_another_node(
    api: Api, versions: list[str]
) -> None:
    """Nothing in the control plane's output folder: the evaluation's MLflow run has it."""
    from thinkforge.jobs.evaluate import (
        EVAL_TAG,
        BudgetSummary,
        EvalResult,
        QuestionResult,
        log_to_mlflow,
    )

    deploy(api, 1)
    body = {"deployment": "sums", "dataset": upload(api, jsonl(S1K)).json()["id"], "budgets": [{}]}
    ev = api.client.post("/v1/evals", json=body).json()["id"]
    reconcile(api)
    summary = BudgetSummary(
        budget="full", key="full", thinking={}, questions=2, correct=1, accuracy=0.5,
        avg_thinking_tokens=7.0, avg_waits=0.0, forced_end_rate=0.0, errors=0,
    )  # fmt: skip
    answers = [
        QuestionResult(budget="full", index=i, question="q", reference="4", prediction=p,
                       correct=p == "4", thinking_tokens=7, model_version=1)
        for i, p in enumerate(["4", "5"])
    ]  # fmt: skip
    result = EvalResult(
        model="sums", base_url="http://serve/v1", dataset="d.jsonl", questions=2, duration_s=1.0,
        budgets=[summary], results=answers, model_versions=[1],
    )  # fmt: skip
    run_id = log_to_mlflow(
        result, api.settings.mlflow_tracking_uri, run_name=ev, tags={EVAL_TAG: ev},
        artifact_location=api.settings.mlflow_artifact_root,
    )  # fmt: skip
    assert not (api.settings.data_dir / "evals" / ev / "results.json").exists()
    api.launcher.set(ev, LaunchState.SUCCEEDED)
    reconcile(api)
    done = api.client.get(f"/v1/evals/{ev}").json()
    assert done["status"] == "succeeded", done["error"]
    assert done["best_accuracy"] == 0.5 and done["mlflow_run_id"] == run_id
    assert done["budgets"][0]["avg_thinking_tokens"] == 7.0
    assert done["model_version"] == f"{NAME}/1"
    png = api.client.get(done["plot_url"])
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG\r\n\x1a\n")


def test_a_registry_version_is_evaluated_without_a_deployment(
    api: Api, versions: list[str]
) -> None:
    api.settings.promotion_requires_eval = True
    api.settings.promotion_min_accuracy = 0.8
    try:
        file_id = upload(api, jsonl(S1K)).json()["id"]
        body = {"model": f"{NAME}/2", "dataset": file_id, "budgets": [{"max_tokens": 4}, {}]}
        resp = api.client.post("/v1/evals", json=body)
        assert resp.status_code == 200, resp.text
        ev = resp.json()
        assert ev["deployment"] is None and ev["model_version"] == f"{NAME}/2"
        assert ev["config"]["model_uri"] == f"models:/{NAME}/2" and ev["config"]["base_url"] is None
        reconcile(api)
        (spec,) = [s for s in api.launcher.submissions if s.job_id == ev["id"]]
        assert spec.module == "thinkforge.jobs.evaluate"
        # The MLflow URI may hold credentials: not in the config members read, nor on the
        # command line; the launcher hands it to the job in its environment.
        uri = api.settings.mlflow_tracking_uri
        assert uri not in json.dumps(ev) and uri not in " ".join(spec.args)
        finish(api, ev["id"], 0.9, answered_by=[2])
        done = api.client.get(f"/v1/evals/{ev['id']}").json()
        assert done["status"] == "succeeded" and done["model_version"] == f"{NAME}/2"
        put = api.client.put(f"/v1/registry/models/{NAME}/aliases/production", json={"version": 2})
        assert put.status_code == 200, put.text  # the version's own evaluation counts

        both = {**body, "deployment": "sums"}
        assert_error(api.client.post("/v1/evals", json=both), 400)
        neither = {k: v for k, v in body.items() if k != "model"}
        assert_error(api.client.post("/v1/evals", json=neither), 400)
        missing = {**body, "model": "no-such-model/1"}
        assert_error(api.client.post("/v1/evals", json=missing), 404, "model")
        assert len(api.client.get("/v1/evals").json()["data"]) == 1
    finally:
        api.settings.promotion_requires_eval = False


def test_a_file_a_live_evaluation_reads_cannot_be_deleted(api: Api, versions: list[str]) -> None:
    deploy(api, 1)
    file_id = upload(api, jsonl(S1K, S1K)).json()["id"]
    body = {"deployment": "sums", "dataset": file_id, "budgets": [{}]}
    ev = api.client.post("/v1/evals", json=body).json()
    err = assert_error(api.client.delete(f"/v1/files/{file_id}"), 409, "file_id")
    assert ev["id"] in err["message"]
    assert api.client.get(f"/v1/files/{file_id}").status_code == 200
    finish(api, ev["id"], 0.5)
    assert api.client.delete(f"/v1/files/{file_id}").status_code == 200
