"""The CLI: `thinkforge up` serves until interrupted; keys, files and jobs commands over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from typer.testing import CliRunner

from tests.conftest import free_port, seed_mlflow_store
from tests.platform.conftest import BOOTSTRAP_KEY, Api
from tests.platform.data import S1K, jsonl
from tests.platform.test_api_evals import finish
from tests.platform.test_api_evals import reconcile as reconcile_evals_now
from tests.platform.test_registry_mlflow import NAME
from thinkforge.cli import app, job_request

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_up_keys_files_jobs(tmp_path: Path) -> None:
    port = free_port()
    seed_mlflow_store(tmp_path / "data" / "mlflow.db")
    env = {
        **os.environ,
        "THINKFORGE_DATA_DIR": str(tmp_path / "data"),
        "THINKFORGE_START_RECONCILER": "false",
        # Nothing listens there: this test covers the API and CLI, not Ray.
        "THINKFORGE_RAY_ADDRESS": "http://127.0.0.1:9",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "thinkforge.cli", "up", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, server)
        runner = CliRunner()
        created = runner.invoke(
            app, ["keys", "create", "--project", "team-a", "--name", "ci"], env=env
        )
        assert created.exit_code == 0, created.output
        key = created.stdout.strip().splitlines()[-1]
        assert key.startswith("tf-") and " " not in key
        cli_env = {**env, "THINKFORGE_API_URL": url, "THINKFORGE_API_KEY": key}
        data = tmp_path / "train.jsonl"
        data.write_bytes(jsonl(S1K, S1K))
        up = runner.invoke(app, ["files", "upload", str(data)], env=cli_env)
        assert up.exit_code == 0, up.output
        file_id = json.loads(up.stdout)["id"]
        made = runner.invoke(
            app,
            ["jobs", "create", "--model", "thinkforge/tiny", "--training-file", file_id, "seed=3"],
            env=cli_env,
        )
        assert made.exit_code == 0, made.output
        job = json.loads(made.stdout)
        assert job["seed"] == 3 and job["organization_id"] == "team-a"
        listed = runner.invoke(app, ["jobs", "list"], env=cli_env)
        assert job["id"] in listed.stdout
        bad = runner.invoke(app, ["jobs", "get", "ftjob-missing"], env=cli_env)
        assert bad.exit_code != 0
        # Not running (no reconciler here): pause is a 409 (main() prints APIError and
        # exits 1), cancel ends it, and a cancelled job cannot be resumed (409).
        paused = runner.invoke(app, ["jobs", "pause", job["id"]], env=cli_env)
        assert "409 conflict_error" in str(paused.exception), paused.output
        cancelled = runner.invoke(app, ["jobs", "cancel", job["id"]], env=cli_env)
        assert cancelled.exit_code == 0, cancelled.output
        assert json.loads(cancelled.stdout)["status"] in {"cancelling", "cancelled"}
        resumed = runner.invoke(app, ["jobs", "resume", job["id"]], env=cli_env)
        assert "409 conflict_error" in str(resumed.exception), resumed.output
        with httpx.Client(base_url=url) as anon:
            assert anon.get("/v1/fine_tuning/jobs").status_code == 401
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    assert server.returncode == 0, server.stdout.read() if server.stdout else ""


def _wait_ready(url: str, server: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stdout.read() if server.stdout else ""
        try:
            # Ready but for Ray, which this test leaves out on purpose.
            if httpx.get(f"{url}/readyz", timeout=10).json()["status"] == "unavailable: ray":
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError("thinkforge up never became ready")


def test_job_request_from_recipe_and_overrides(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: base\ndataset: /data/x.jsonl\nblock_size: 512\nregistered_model_name: mine\n"
        "hyperparameters: {learning_rate: 1.0e-5, n_epochs: 5}\nresources: {num_workers: 2}\n"
    )
    body = job_request(recipe, ["hyperparameters.n_epochs=2", "template=r1"])
    assert body == {
        "model": "base",
        "training_file": "/data/x.jsonl",
        "method": {
            "type": "supervised",
            "supervised": {"hyperparameters": {"learning_rate": 1e-5, "n_epochs": 2}},
        },
        "resources": {"num_workers": 2},
        "suffix": "mine",
        "recipe": "r",
        "config": {"block_size": 512, "template": "r1"},
    }


def test_models_deploy_and_eval_commands(api: Api, versions: list[str], tmp_path: Path) -> None:
    """The registry, deployment and evaluation commands against a live API (fake Ray)."""
    env = {"THINKFORGE_API_URL": api.url, "THINKFORGE_API_KEY": BOOTSTRAP_KEY, "COLUMNS": "200"}
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(app, list(args), env=env)
        assert result.exit_code == 0, result.output
        return result.stdout

    assert NAME in cli("models", "list")
    shown = json.loads(cli("models", "show", f"{NAME}/1"))
    assert shown["version"] == 1 and "config.json" in shown["manifest"]
    cli("models", "promote", NAME, "1", "--reason", "first")
    cli("models", "promote", NAME, "2")
    cli("models", "rollback", NAME, "--reason", "regression")
    model = api.client.get(f"/v1/registry/models/{NAME}").json()
    assert model["aliases"] == {"production": 1}
    audit = api.client.get("/v1/audit", params={"target": f"{NAME}@production"}).json()["data"]
    assert (audit[0]["action"], audit[0]["reason"]) == ("rollback", "regression")  # newest first

    deployed = json.loads(
        cli("deploy", "sums", "--model", f"{NAME}@production", "--max-thinking", "64")
    )
    assert deployed["status"] == "running" and deployed["served_version"] == f"{NAME}/1"
    again = json.loads(cli("deploy", "sums", "--model", f"{NAME}/2", "--no-wait"))
    assert again["model"] == f"{NAME}/2"  # an existing name is updated
    thinking = api.client.get("/v1/deployments/sums").json()["config"]["default_thinking"]
    assert thinking["max_tokens"] == 64  # kept through the update

    questions = tmp_path / "heldout.jsonl"
    questions.write_bytes(jsonl(S1K))

    def finish_when_created() -> None:
        deadline = time.monotonic() + 30
        while not (listed := api.client.get("/v1/evals").json()["data"]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        reconcile_evals_now(api)
        finish(api, listed[0]["id"], 0.5)

    helper = threading.Thread(target=finish_when_created)
    helper.start()
    out = cli(
        "eval", "sums", "--dataset", str(questions), "--max-thinking", "0,full", "--limit", "2"
    )
    helper.join()
    assert "full" in out and "50.0%" in out
    (ev,) = api.client.get("/v1/evals").json()["data"]
    assert [b["max_tokens"] for b in ev["config"]["budgets"]] == [0, None]  # 0, then full
