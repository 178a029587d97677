"""SQLite under load (issue 15, item 4): a 200 MB upload validating and a running job whose
progress reads take 1.5 s (the reconciler syncs it every pass), while 20 clients list jobs
and get a file and a job. The API runs in its own process (uvicorn, SQLite, its reconciler
on), so the clients' threads do not share its interpreter. Prints the upload time, list
p50/p99/max and any 5xx. The CI-sized run is tests/platform/test_sqlite_load.py.

    PYTHONPATH=. .venv/bin/python bench/sqlite_load.py [--mb 200] [--thinking 2000]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.platform.conftest import BOOTSTRAP_KEY, make_settings
from tests.platform.test_sqlite_load import SlowTracker, big_upload, p99, run_load
from thinkforge.platform.launcher import LaunchSpec, LaunchState, LaunchStatus


class RunningLauncher:
    """Every submitted job runs, for as long as the bench lasts."""

    def __init__(self) -> None:
        self.jobs: set[str] = set()

    def submit(self, spec: LaunchSpec) -> None:
        self.jobs.add(spec.job_id)

    def cancel(self, job_id: str) -> None:
        self.jobs.discard(job_id)

    def status(self, job_id: str) -> LaunchStatus:
        state = LaunchState.RUNNING if job_id in self.jobs else LaunchState.UNKNOWN
        return LaunchStatus(state)


def serve(folder: Path, port: int) -> None:
    import uvicorn

    from thinkforge.platform.app import create_app

    settings = make_settings(
        folder, f"sqlite:///{folder / 'thinkforge.db'}", start_reconciler=True,
        reconcile_interval_s=0.5,
    )  # fmt: skip
    app = create_app(settings, launcher=RunningLauncher())
    app.state.ctx.tracker = SlowTracker()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def measure(mb: int, thinking: int) -> dict[str, object]:
    data = big_upload(mb * 1000 * 1000, thinking)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = subprocess.Popen([sys.executable, __file__, "--serve", tmp, "--port", str(port)])
        url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
        try:
            with httpx.Client(base_url=url, headers=headers, timeout=600) as http:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        if http.get("/readyz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, "the API did not start"
                    time.sleep(0.2)
                files = {"file": ("t.jsonl", big_upload(1000))}
                small = http.post("/v1/files", files=files, data={"purpose": "fine-tune"})
                job = http.post(
                    "/v1/fine_tuning/jobs",
                    json={"model": "thinkforge/tiny", "training_file": small.json()["id"]},
                ).json()["id"]
                while http.get(f"/v1/fine_tuning/jobs/{job}").json()["status"] != "running":
                    time.sleep(0.2)
                stop = threading.Event()
                with cf.ThreadPoolExecutor(max_workers=1) as pool:
                    load = pool.submit(run_load, url, small.json()["id"], job, stop)
                    time.sleep(1.0)
                    started = time.monotonic()
                    files = {"file": ("big.jsonl", data)}
                    uploaded = http.post("/v1/files", files=files, data={"purpose": "fine-tune"})
                    upload_s = time.monotonic() - started
                    stop.set()
                    result = load.result()
        finally:
            server.terminate()
            server.wait(timeout=30)
    lists = result["lists"]
    return {
        "upload_mb": mb, "upload_status": uploaded.status_code, "upload_s": round(upload_s, 1),
        "lists": len(lists), "list_p50_s": round(sorted(lists)[len(lists) // 2], 3),
        "list_p99_s": round(p99(lists), 3), "list_max_s": round(max(lists), 3),
        "server_errors": len([c for c in result["codes"] if c >= 500]),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200, help="upload size in MB")
    parser.add_argument("--thinking", type=int, default=2000, help="characters of thinking per row")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    print(json.dumps(measure(args.mb, args.thinking), indent=2))


if __name__ == "__main__":
    main()
