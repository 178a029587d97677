"""Time from ``POST /v1/fine_tuning/jobs`` to the first training step, through the real stack.

Starts a local Ray head and ``thinkforge up`` against it, uploads the synthetic data,
posts a tiny-cpu job (2 DDP workers) and reports, from the job's own events, how long
each stage took: queued, running (Ray job started), first step's metrics recorded.

    .venv/bin/python bench/job_latency.py [--runs 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from thinkforge.jobs.synthetic import write_jsonl
from thinkforge.platform.ray_cluster import LocalRayCluster, free_port

KEY = "tf-bench-latency-key-0123456789abcdef"
REPO = Path(__file__).resolve().parents[1]


def one_run(cluster: LocalRayCluster, tmp: Path) -> dict[str, float]:
    port = free_port()
    env = {
        **os.environ,
        "THINKFORGE_DATA_DIR": str(tmp / "data"),
        "THINKFORGE_RAY_ADDRESS": cluster.dashboard_url,
        "THINKFORGE_RAY_AUTH_TOKEN": cluster.token,
        "THINKFORGE_BOOTSTRAP_API_KEY": KEY,
        "THINKFORGE_RECONCILE_INTERVAL_S": "0.5",
        "THINKFORGE_RECIPES_DIR": str(REPO / "recipes"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "thinkforge.cli", "up", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            data = write_jsonl(tmp / "sums.jsonl", n=256, seed=0)
            with open(data, "rb") as fh:
                file_id = client.post(
                    "/v1/files", files={"file": ("s.jsonl", fh)}, data={"purpose": "fine-tune"}
                ).json()["id"]
            body = {"model": "thinkforge/tiny", "training_file": file_id, "recipe": "tiny-cpu",
                    "method": {"type": "supervised", "supervised": {"hyperparameters": {"max_steps": 4}}}}  # fmt: skip
            posted = time.time()
            job = client.post("/v1/fine_tuning/jobs", json=body).json()
            marks: dict[str, float] = {}
            while "first_step" not in marks:
                job = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
                assert job["status"] not in ("failed", "cancelled"), job["error"]
                for e in client.get(
                    f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}
                ).json()["data"]:
                    status = (e["data"] or {}).get("status")
                    if status in ("queued", "running"):
                        marks.setdefault(status, time.time())
                    if e["type"] == "metrics":
                        marks.setdefault("first_step", time.time())
                time.sleep(0.2)
            while client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] != "succeeded":
                time.sleep(0.5)
        return {k: v - posted for k, v in marks.items()}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    with LocalRayCluster(num_cpus=2, dashboard_port=free_port(), gcs_port=free_port()) as cluster:
        runs = []
        for i in range(args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(one_run(cluster, Path(tmp)))
            print(
                f"run {i + 1}: " + "  ".join(f"{k}={v:.1f}s" for k, v in runs[-1].items()),
                flush=True,
            )
    for key in ("queued", "running", "first_step"):
        values = [r[key] for r in runs if key in r]
        print(f"POST -> {key:10s} median {statistics.median(values):6.1f} s  (runs: {len(values)})")


if __name__ == "__main__":
    main()
