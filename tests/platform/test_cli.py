"""The CLI: `thinkforge up` serves until interrupted; keys, files and jobs commands over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from typer.testing import CliRunner

from tests.conftest import free_port
from tests.platform.data import S1K, jsonl
from thinkforge.cli import app, job_request

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_up_keys_files_jobs(tmp_path: Path) -> None:
    port = free_port()
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
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
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
