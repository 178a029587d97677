"""SQLite under load: slow work (validating an upload, reading a running job's progress from
MLflow) happens outside write transactions, so 20 clients listing and getting meanwhile
see no 5xx, SQLite's write lock stays free during a slow read, and no list waits out the
upload. CI-sized; bench/sqlite_load.py runs the 200 MB version."""

from __future__ import annotations

import concurrent.futures as cf
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import LiveServer
from tests.platform.conftest import BOOTSTRAP_KEY, make_settings
from tests.platform.data import S1K
from tests.platform.fakes import FakeLauncher, FakeServe
from thinkforge.platform.app import create_app
from thinkforge.platform.launcher import LaunchState
from thinkforge.platform.reconciler import reconcile_once

SLOW_S = 1.5  # what one read of MLflow and the checkpoint store takes here


class SlowTracker:
    """A tracker whose reads of the outside systems take SLOW_S (as a busy MLflow does).
    With ``db_path`` each read also tries to take SQLite's write lock meanwhile: it gets it
    unless the caller holds a write transaction across the read (then the read cannot
    end, the lock is never freed, and the try times out)."""

    def __init__(self, db_path: Path | None = None) -> None:
        self.reads = 0
        self.db_path = db_path
        self.lock_errors: list[str] = []

    def fetch(self, job: Any, *, final: bool) -> object:
        time.sleep(SLOW_S)
        if self.db_path is not None:
            probe = sqlite3.connect(self.db_path, timeout=10, isolation_level=None)
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.execute("ROLLBACK")
            except sqlite3.OperationalError as exc:
                self.lock_errors.append(str(exc))
            finally:
                probe.close()
        self.reads += 1
        return object()

    def apply(self, session: Any, job: Any, progress: object) -> None:
        pass

    def sync(self, session: Any, job: Any, *, final: bool) -> None:  # the old one-step form
        self.apply(session, job, self.fetch(job, final=final))


def big_upload(size: int, thinking: int = 0) -> bytes:
    """``size`` bytes of s1K rows; short rows (no ``thinking``) are the slowest to validate."""
    row = dict(S1K, thinking_trajectories=["1+2=3 " + "x" * thinking]) if thinking else S1K
    line = (json.dumps(row) + "\n").encode()
    return line * (size // len(line))


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def run_load(url: str, file_id: str, job_id: str, stop: threading.Event) -> dict[str, Any]:
    """20 clients list jobs and get a file and a job until ``stop``; latencies and codes."""
    lists: list[float] = []
    codes: list[int] = []

    def client(_: int) -> None:
        headers = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
            while not stop.is_set():
                started = time.monotonic()
                resp = http.get("/v1/fine_tuning/jobs")
                lists.append(time.monotonic() - started)
                codes.append(resp.status_code)
                codes.append(http.get(f"/v1/files/{file_id}").status_code)
                codes.append(http.get(f"/v1/fine_tuning/jobs/{job_id}").status_code)

    with cf.ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(client, range(20)))
    return {"lists": lists, "codes": codes}


def measure(tmp_path: Path, *, upload_bytes: int, thinking: int = 0) -> dict[str, Any]:
    """The scenario: a live API on SQLite; 20 clients list and get while one client uploads
    ``upload_bytes`` and the reconciler syncs a running job twice through a slow tracker."""
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'thinkforge.db'}")
    launcher, tracker = FakeLauncher(), SlowTracker(tmp_path / "thinkforge.db")
    app = create_app(settings, launcher=launcher, serve=FakeServe())
    ctx = app.state.ctx
    headers = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
    data = big_upload(upload_bytes, thinking)
    with (
        LiveServer(app) as server,
        httpx.Client(base_url=server.url, headers=headers, timeout=600) as http,
    ):
        small = http.post(
            "/v1/files",
            files={"file": ("t.jsonl", big_upload(1000))},
            data={"purpose": "fine-tune"},
        ).json()["id"]
        job_id = http.post(
            "/v1/fine_tuning/jobs", json={"model": "thinkforge/tiny", "training_file": small}
        ).json()["id"]
        reconcile_once(ctx.sessions, launcher)
        launcher.set(job_id, LaunchState.RUNNING)

        stop = threading.Event()
        with cf.ThreadPoolExecutor(max_workers=3) as pool:
            load = pool.submit(run_load, server.url, small, job_id, stop)
            time.sleep(0.5)  # the clients are going
            started = time.monotonic()
            upload = pool.submit(
                http.post, "/v1/files", files={"file": ("big.jsonl", data)},
                data={"purpose": "fine-tune"},
            )  # fmt: skip
            syncs = pool.submit(
                lambda: [reconcile_once(ctx.sessions, launcher, tracker) for _ in range(2)]
            )
            uploaded, _ = upload.result(), syncs.result()
            upload_s = time.monotonic() - started
            stop.set()
            result = load.result()
    lists = result["lists"]
    return {
        "upload_status": uploaded.status_code, "upload_text": uploaded.text[:300],
        "upload_s": upload_s, "tracker_reads": tracker.reads, "lists": len(lists),
        "write_lock_held_across_a_read": tracker.lock_errors,
        "list_p50_s": sorted(lists)[len(lists) // 2], "list_p99_s": p99(lists),
        "list_max_s": max(lists), "server_errors": [c for c in result["codes"] if c >= 500],
    }  # fmt: skip


def test_slow_work_holds_no_write_transaction(tmp_path: Path) -> None:
    m = measure(tmp_path, upload_bytes=4 << 20)
    print(m)
    assert m["upload_status"] == 200, m["upload_text"]
    assert m["tracker_reads"] == 2
    assert m["server_errors"] == []
    assert m["write_lock_held_across_a_read"] == [], m
    # No list waited out the upload's validation (latency itself is bench/sqlite_load.py's:
    # 20 clients share the server's process, and its GIL, with the validation).
    assert m["list_p99_s"] < m["upload_s"], m
