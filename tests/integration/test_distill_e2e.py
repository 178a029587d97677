"""Distillation end to end: REST -> Ray Job (Ray Data asking a real Serve deployment of the
tiny model through the front door) -> verified, curated s1K-1.1 file -> a fine-tune job
trains on it -> the registered model's lineage names the distillation.

The teacher is the untrained tiny model (registered as test_serving_e2e does), so it
rarely answers right: the request keeps unverified traces (``min_correct: 0``) and
budget-ended ones, and the test checks the verification counts agree with each other.
Verification and every curation stage are tested with right and wrong answers in
tests/jobs/test_distill.py; the quality comparison is bench/distill_loop.py's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import serving_plane
from tests.integration.test_serving_e2e import NAME, register
from thinkforge.jobs.tiny import ensure_tiny_model
from thinkforge.platform.ray_cluster import LocalRayCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TERMINAL = {"succeeded", "failed", "cancelled"}
QUESTIONS = [
    {"question": "Sum: 3 4", "answer": "7"},
    {"question": "Sum: 1 2 5", "answer": "8"},
    {"question": "Sum: 9 1", "solution": "9+1 = \\boxed{10}"},
]


def wait(client: httpx.Client, path: str, until: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = dict(client.get(path).json())
        if until(found):
            return found
        assert time.monotonic() < deadline, found
        time.sleep(1)


def test_distill_from_a_deployment_to_a_trained_model(
    ray_cluster: LocalRayCluster, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    uri, artifacts = f"sqlite:///{data / 'mlflow.db'}", str(data / "mlartifacts")
    # Registered before the control plane opens the same SQLite MLflow store.
    assert register(uri, artifacts, ensure_tiny_model(tmp_path / "models"), "ftjob-t") == (
        f"{NAME}/1"
    )
    plane, _ = serving_plane(data, ray_cluster)
    try:
        with plane.client() as client:
            made = client.post("/v1/deployments", json={"name": "teacher", "model": f"{NAME}/1"})
            assert made.status_code == 200, made.text
            wait(client, "/v1/deployments/teacher", lambda d: d["status"] == "running", 300)
            pool = "".join(json.dumps(q) + "\n" for q in QUESTIONS).encode()
            up = client.post("/v1/files", files={"file": ("pool.jsonl", pool)},
                             data={"purpose": "distill"})  # fmt: skip
            assert up.status_code == 200, up.text
            body = {
                "question_file": up.json()["id"], "teacher": {"deployment": "teacher"},
                "samples": 1, "thinking": {"max_tokens": 8}, "max_completion_tokens": 24,
                # Sampled: greedy, the untrained model repeats one blank token (a malformed
                # trace, which curation rightly drops: tried, the job failed nothing_kept).
                "temperature": 1.0, "seed": 3, "concurrency": 2,
                "curation": {"min_correct": 0, "drop_forced_end": False},
            }  # fmt: skip
            resp = client.post("/v1/datasets/distill", json=body)
            assert resp.status_code == 200, resp.text
            distill_id = resp.json()["id"]
            done = wait(client, f"/v1/datasets/distill/{distill_id}",
                        lambda d: d["status"] in TERMINAL, 300)  # fmt: skip
            assert done["status"] == "succeeded", (done["error"], done["stages"])
            check_counts(client, done)
            trained = train_on(client, done["output_file"])
            name, version = trained["fine_tuned_model"].split("/")
            lineage = client.get(f"/v1/registry/models/{name}/versions/{version}").json()
            assert lineage["lineage"]["distill_id"] == distill_id
            assert json.loads(lineage["lineage"]["distill_teacher"])["deployment"] == "teacher"
    finally:
        plane.stop()


def check_counts(client: httpx.Client, done: dict[str, Any]) -> None:
    counts, stages = done["counts"], done["stages"]
    assert counts["questions"] == 3 and counts["traces"] == 3
    assert stages["verified"]["correct_traces"] == counts["correct_traces"] <= 3
    kept = stages["quality"]["questions_kept"]
    assert kept + stages["quality"]["malformed"] == 3  # nothing else is dropped here
    assert counts["kept"] == stages["final"] == kept >= 1
    output = client.get(f"/v1/files/{done['output_file']}").json()
    assert output["purpose"] == "fine-tune" and output["num_records"] == counts["kept"]
    rows = [json.loads(x) for x in
            client.get(f"/v1/files/{done['output_file']}/content").text.splitlines()]  # fmt: skip
    right = sum(r["metadata"]["correct"] for r in rows)
    assert right <= counts["correct_traces"]
    # The deployment's budget held: no kept trace thought longer than 8 tokens.
    assert all(r["metadata"]["thinking_tokens"] <= 8 for r in rows)
    events = client.get(f"/v1/datasets/distill/{done['id']}/events?limit=100").json()["data"]
    progress = [e["data"] for e in events if e["type"] == "progress"]
    assert max(p["done"] for p in progress) == 3 and all(p["total"] == 3 for p in progress)
    assert events[0]["type"] == "finished"  # newest first


def train_on(client: httpx.Client, file_id: str) -> dict[str, Any]:
    """A fine-tune job on the curated file: one worker (the deployment holds half a CPU of
    the cluster's two), two steps."""
    body = {
        "model": "thinkforge/tiny", "training_file": file_id, "recipe": "tiny-cpu",
        "suffix": "distilled", "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "method": {"type": "supervised",
                   "supervised": {"hyperparameters": {"max_steps": 2, "batch_size": 2,
                                                      "micro_batch_size": 1}}},
    }  # fmt: skip
    resp = client.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 200, resp.text
    job = wait(client, f"/v1/fine_tuning/jobs/{resp.json()['id']}",
               lambda j: j["status"] in TERMINAL, 400)  # fmt: skip
    assert job["status"] == "succeeded", job
    assert job["fine_tuned_model"]
    return job
