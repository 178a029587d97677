"""Serving end to end: registry version -> REST deployment -> Ray Serve -> openai client.

A deployment follows ``tiny@production``; promoting a new version rolls it under
constant load with zero failed requests; a damaged version is refused and the old one
keeps serving; deleting the deployment removes it from Serve.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import seed_mlflow_store
from tests.integration.conftest import API_KEY, serving_plane
from thinkforge.jobs.config import SFTConfig
from thinkforge.jobs.tiny import ensure_tiny_model
from thinkforge.jobs.tracking import open_job_run, register_model
from thinkforge.platform.ray_cluster import LocalRayCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]
NAME = "tiny"


def register(uri: str, artifacts: str, model_dir: Path, job_id: str) -> str:
    config = SFTConfig(model="thinkforge/tiny", dataset="x.jsonl", recipe="tiny-cpu")
    run_id = open_job_run(
        tracking_uri=uri,
        job_id=job_id,
        config=config,
        dataset_sha256="0" * 64,
        artifact_root=artifacts,
    )
    return register_model(
        tracking_uri=uri, run_id=run_id, model_dir=model_dir, name=NAME, job_id=job_id,
        base_model="thinkforge/tiny", dataset_sha256="0" * 64,
    )  # fmt: skip


def chat(port: int, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"model": NAME, "messages": [{"role": "user", "content": "Sum: 1 2"}],
              "max_completion_tokens": 24, "thinking": {"max_tokens": 8}, **extra},
        headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
    )  # fmt: skip


def wait_deployment(client: httpx.Client, version: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        dep = dict(client.get(f"/v1/deployments/{NAME}").json())
        if dep["status"] == "running" and dep["served_version"] == version:
            return dep
        assert dep["status"] != "failed", dep
        assert time.monotonic() < deadline, dep
        time.sleep(1)


def wait_status(client: httpx.Client, status: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        dep = dict(client.get(f"/v1/deployments/{NAME}").json())
        if dep["status"] == status:
            return dep
        assert time.monotonic() < deadline, dep
        time.sleep(1)


def test_deploy_roll_refuse_and_delete(
    ray_cluster: LocalRayCluster, tmp_path: Path, serve_port: int
) -> None:
    data = tmp_path / "data"
    uri, artifacts = f"sqlite:///{seed_mlflow_store(data / 'mlflow.db')}", str(data / "mlartifacts")
    tiny = ensure_tiny_model(tmp_path / "models")
    # Registered before the control plane opens the same SQLite MLflow store (the first
    # opening of a new store migrates it; two processes doing that at once collide).
    for i in (1, 2, 3):
        assert register(uri, artifacts, tiny, f"ftjob-{i}") == f"{NAME}/{i}"
    plane, _ = serving_plane(data, ray_cluster, serve_port)
    try:
        with plane.client() as client:
            assert (
                client.put(
                    f"/v1/registry/models/{NAME}/aliases/production", json={"version": 1}
                ).status_code
                == 200
            )
            made = client.post(
                "/v1/deployments",
                json={"name": NAME, "model": f"{NAME}@production", "max_ongoing_requests": 4,
                      "max_queued_requests": 32, "default_thinking": {"max_tokens": 8}},
            )  # fmt: skip
            assert made.status_code == 200, made.text
            wait_deployment(client, f"{NAME}/1")
            first = chat(serve_port)
            assert first.status_code == 200, first.text
            assert first.headers["x-thinkforge-model-version"] == "1"
            assert first.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] <= 8
            check_jobs_that_cannot_get_their_workers(client, tmp_path)

            failures: list[str] = []
            versions: list[str] = []
            stop = threading.Event()

            def load() -> None:
                while not stop.is_set():
                    resp = chat(serve_port)
                    if resp.status_code != 200:
                        failures.append(f"{resp.status_code} {resp.text[:200]}")
                    else:
                        versions.append(resp.headers["x-thinkforge-model-version"])

            workers = [threading.Thread(target=load) for _ in range(2)]
            for w in workers:
                w.start()
            try:
                time.sleep(2)
                moved = client.put(
                    f"/v1/registry/models/{NAME}/aliases/production", json={"version": 2}
                )
                assert moved.status_code == 200, moved.text
                wait_deployment(client, f"{NAME}/2")
                time.sleep(3)
            finally:
                stop.set()
                for w in workers:
                    w.join(timeout=120)
            assert failures == []
            assert "1" in versions and versions[-1] == "2"
            assert chat(serve_port).headers["x-thinkforge-model-version"] == "2"

            from mlflow.tracking import MlflowClient

            source = MlflowClient(tracking_uri=uri).get_model_version(NAME, "3").source
            damaged = Path(source) / "model.safetensors"
            damaged.write_bytes(damaged.read_bytes()[:-8] + b"\x00" * 8)
            refused = client.put(
                f"/v1/registry/models/{NAME}/aliases/production", json={"version": 3}
            )
            assert (
                refused.status_code == 409
                and refused.json()["error"]["code"] == "integrity_check_failed"
            )
            assert chat(serve_port).headers["x-thinkforge-model-version"] == "2"
            assert client.get(f"/v1/deployments/{NAME}").json()["served_version"] == f"{NAME}/2"

            # Files that match their manifest but do not load: the rollout fails, v2 serves on.
            broken = tmp_path / "broken"
            shutil.copytree(tiny, broken)
            (broken / "config.json").write_text('{"model_type": "qwen2", "vocab_size": "many"}')
            assert register(uri, artifacts, broken, "ftjob-4") == f"{NAME}/4"
            moved = client.put(
                f"/v1/registry/models/{NAME}/aliases/production", json={"version": 4}
            )
            assert moved.status_code == 200, moved.text
            dep = wait_status(client, "degraded")
            assert dep["served_version"] == f"{NAME}/2" and dep["message"]
            assert chat(serve_port).headers["x-thinkforge-model-version"] == "2"
            back = client.post(f"/v1/registry/models/{NAME}/aliases/production/rollback")
            assert back.status_code == 200 and back.json()["version"] == 2, back.text
            wait_deployment(client, f"{NAME}/2")

            assert client.delete(f"/v1/deployments/{NAME}").status_code == 200
            deadline = time.monotonic() + 120
            while chat(serve_port).status_code == 200 and time.monotonic() < deadline:
                time.sleep(1)
            assert chat(serve_port).status_code == 404
            deadline = time.monotonic() + 120  # the model's app leaves Serve once the door has
            while client.get(f"/v1/deployments/{NAME}").status_code != 404:
                assert time.monotonic() < deadline, "the deployment was never removed"
                time.sleep(1)
    finally:
        plane.stop()


def check_jobs_that_cannot_get_their_workers(client: httpx.Client, tmp_path: Path) -> None:
    """The deployment holds part of the cluster's 2 CPUs: a 2-worker job stays queued and
    says what it waits for; a job larger than the whole cluster fails at once."""
    from tests.integration.test_training_e2e import TERMINAL, events, upload_sums, wait_job

    file_id = upload_sums(client, tmp_path, n=16)

    def job(workers: int) -> dict[str, Any]:
        body = {"model": "thinkforge/tiny", "training_file": file_id, "recipe": "tiny-cpu",
                "resources": {"num_workers": workers, "cpus_per_worker": 1}}  # fmt: skip
        resp = client.post("/v1/fine_tuning/jobs", json=body)
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    never = job(3)
    failed = wait_job(client, never["id"], lambda j: j["status"] in TERMINAL, timeout=60)
    assert failed["status"] == "failed" and failed["error"]["code"] == "insufficient_resources"
    assert "3" in failed["error"]["message"] and "CPU" in failed["error"]["message"]

    waiting = job(2)
    deadline = time.monotonic() + 240
    while not (found := [e for e in events(client, waiting["id"]) if e["type"] == "waiting"]):
        assert time.monotonic() < deadline, events(client, waiting["id"])
        time.sleep(1)
    data = found[0]["data"]
    assert data["asked"] == {"workers": 2, "per_worker": {"CPU": 1.0}}
    assert data["total"]["CPU"] == 2 and data["free"]["CPU"] < 2
    held = {h["holder"]: h["resources"] for h in data["held_by"]}
    assert any(NAME in holder and "Serve" in holder for holder in held), held
    assert "Serve" in found[0]["message"] and "free" in found[0]["message"]
    time.sleep(5)
    assert client.get(f"/v1/fine_tuning/jobs/{waiting['id']}").json()["status"] == "queued"
    assert client.post(f"/v1/fine_tuning/jobs/{waiting['id']}/cancel").status_code == 200
    done = wait_job(client, waiting["id"], lambda j: j["status"] in TERMINAL, timeout=120)
    assert done["status"] == "cancelled"


def lora_chat(port: int, model: str) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Sum: 1 2"}],
              "max_completion_tokens": 24, "thinking": {"max_tokens": 8}, "temperature": 0},
        headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
    )  # fmt: skip


def base_weights_unchanged(checkpoint: Path, base: Path) -> None:
    """The frozen base in the job's last DCP state is the base it started from, bit for bit."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from thinkforge.jobs.lora import hf_name

    dcp_to_torch_save(checkpoint / "dcp", checkpoint.parent / "state.pt")
    state = torch.load(checkpoint.parent / "state.pt", weights_only=False)["model"]
    original = load_file(base / "model.safetensors")
    frozen = {hf_name(k): v for k, v in state.items() if ".lora_" not in k}
    assert set(original) <= set(frozen)  # and lm_head.weight, tied to the embeddings
    assert all(torch.equal(frozen[k], original[k]) for k in original)
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in state.items())  # it trained


def test_lora_job_adapter_deploys_and_two_adapters_answer_differently(
    ray_cluster: LocalRayCluster, tmp_path: Path, serve_port: int
) -> None:
    """A LoRA job through REST (2 CPU workers, DDP): its loss falls, its base stays bit
    for bit, its adapter version deploys over the base and answers; a second adapter on
    the same deployment (``lora:other``) answers differently, budgets forced alike."""
    from tests.integration.test_training_e2e import (
        TERMINAL,
        events,
        metric_steps,
        upload_sums,
        wait_job,
    )
    from tests.serve.test_engine_lora import make_adapter
    from thinkforge.contract import LORA_TAG

    data = tmp_path / "data"
    uri, artifacts = f"sqlite:///{seed_mlflow_store(data / 'mlflow.db')}", str(data / "mlartifacts")
    tiny = ensure_tiny_model(tmp_path / "models")
    other = make_adapter(tiny, tmp_path / "other", 2, "thinkforge/tiny")
    config = SFTConfig(model="thinkforge/tiny", dataset="x.jsonl", lora={"r": 8})
    run_id = open_job_run(tracking_uri=uri, job_id="ftjob-other", config=config,
                          dataset_sha256="0" * 64, artifact_root=artifacts)  # fmt: skip
    register_model(
        tracking_uri=uri, run_id=run_id, model_dir=other, name="other-lora", job_id="ftjob-other",
        base_model="thinkforge/tiny", dataset_sha256="0" * 64, tags={LORA_TAG: "adapter"},
    )  # fmt: skip
    plane, _ = serving_plane(data, ray_cluster, serve_port)
    try:
        with plane.client() as client:
            file_id = upload_sums(client, tmp_path)
            lora = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj",
                    "o_proj", "gate_proj", "up_proj", "down_proj"]}  # fmt: skip
            hyper = {"n_epochs": 1, "max_steps": 8, "learning_rate": 2e-2}
            body = {
                "model": "thinkforge/tiny", "training_file": file_id, "recipe": "tiny-cpu",
                "suffix": "sums-lora", "config": {"checkpoint_every_steps": 4},
                "method": {"type": "supervised",
                           "supervised": {"hyperparameters": hyper, "lora": lora}},
                "resources": {"num_workers": 2, "cpus_per_worker": 0.5},
            }  # fmt: skip
            made = client.post("/v1/fine_tuning/jobs", json=body)
            assert made.status_code == 200, made.text
            job_id = made.json()["id"]
            done = wait_job(client, job_id, lambda j: j["status"] in TERMINAL, timeout=400)
            assert done["status"] == "succeeded", done["error"]
            assert done["fine_tuned_model"] == "sums-lora/1"
            steps = metric_steps(client, job_id)
            assert len(steps) == 8 and steps[-1]["loss"] < steps[0]["loss"]
            (info,) = [e["data"] for e in events(client, job_id) if e["message"].startswith("LoRA")]
            assert 0 < info["trainable_fraction"] < 0.2
            assert info["trainable_params"] == pytest.approx(
                info["trainable_fraction"] * info["total_params"]
            )
            ckpts = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
            last = max(ckpts, key=lambda c: c["step_number"])["fine_tuned_model_checkpoint"]
            base_weights_unchanged(Path(last.removeprefix("file://")), data / "models" / "tiny")
            version = client.get("/v1/registry/models/sums-lora/versions/1").json()
            assert version["tags"][LORA_TAG] == "adapter"
            assert version["lineage"]["base_model"] == "thinkforge/tiny"
            assert "adapter_model.safetensors" in version["manifest"]
            assert "model.safetensors" not in version["manifest"]  # the adapter alone

            vllm = {"name": "lora-vllm", "model": "sums-lora/1", "engine": "vllm", "device": "cpu"}
            refused = client.post("/v1/deployments", json=vllm)
            assert refused.status_code == 400 and "transformers" in refused.text, refused.text
            plain = client.post(  # an adapter version that does not exist
                "/v1/deployments", json={"name": "x", "model": "sums-lora/1",
                                         "adapters": {"y": "sums-lora/9"}},
            )  # fmt: skip
            assert plain.status_code == 404, plain.text
            made = client.post(
                "/v1/deployments",
                json={"name": "lora", "model": "sums-lora/1", "max_ongoing_requests": 4,
                      "adapters": {"other": "other-lora/1"}},
            )  # fmt: skip
            assert made.status_code == 200, made.text
            deadline = time.monotonic() + 300
            while (dep := client.get("/v1/deployments/lora").json())["status"] != "running":
                assert dep["status"] != "failed" and time.monotonic() < deadline, dep
                time.sleep(1)
            ours, theirs = lora_chat(serve_port, "lora"), lora_chat(serve_port, "lora:other")
            assert ours.status_code == 200 and theirs.status_code == 200, (ours.text, theirs.text)
            assert ours.headers["x-thinkforge-model-version"] == "1"
            for resp in (ours, theirs):
                assert resp.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] <= 8
            said = [r.json()["choices"][0]["message"] for r in (ours, theirs)]
            assert said[0] != said[1], said
            assert lora_chat(serve_port, "lora:nope").status_code == 400
    finally:
        plane.stop()
