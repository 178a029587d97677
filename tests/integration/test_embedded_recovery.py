"""Embedded mode (the control plane starts its own local Ray head) after a crash.

`thinkforge up` is killed with SIGKILL mid-job; its Ray head, in a session of its own,
goes on training. The next start with the same data directory reattaches to that head
(address and token kept in ray-head.json, mode 0600), and the job finishes and registers
exactly once. The head and the jobs on it never see the control plane's secrets.

When the head dies too, the next start begins a new one, on which the job's run is lost:
the job is resubmitted and resumes from its last checkpoint. Killing the head's process
group does not end the run at once: its driver, Ray Train controller and workers live in
process groups of their own and go on (training, logging, checkpointing) for about 5 s,
until they notice the raylet is gone.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port
from tests.integration.conftest import API_KEY, ControlPlane
from tests.integration.test_training_e2e import (
    TERMINAL,
    create_job,
    events,
    upload_sums,
    wait_job,
)
from thinkforge.contract import DATA_METRIC_PREFIX, EVENT_PREFIX, parse_event
from thinkforge.jobs.checkpoints import latest_checkpoint
from thinkforge.platform.ray_cluster import RAY_HEAD_FILE, HeadRecord, read_head, stop_group

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SECRET_KEY = "embedded-secret-key-0123456789abcdef0123456789"


def embedded_env(data_dir: Path) -> dict[str, str]:
    return {
        "THINKFORGE_RAY_NUM_CPUS": "2",
        "THINKFORGE_RAY_DASHBOARD_PORT": str(free_port()),
        "THINKFORGE_SECRET_KEY": SECRET_KEY,
        "THINKFORGE_DATABASE_URL": f"sqlite:///{data_dir / 'thinkforge.db'}",
    }


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "data"
    yield data
    record = read_head(data / RAY_HEAD_FILE)  # a failed test leaves no Ray head behind
    if record is not None:
        stop_group(record.pid)


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (p.decode(errors="replace").partition("=") for p in raw.split(b"\0") if p)
    return {k: v for k, _, v in pairs}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def check_ray_processes(head_pid: int, mlflow_uri: str) -> None:
    """No Ray process (head, raylet, job driver, train workers) holds the control plane's
    secrets; the job's command line does not show the MLflow URI (Ray puts the runtime env
    on the command lines of the workers it starts: docs/production.md); the job's driver
    still has PYTHONPATH and the venv."""
    pids = descendants(head_pid)
    drivers = [pid for pid in pids if "-m thinkforge.jobs " in cmdline(pid)]
    assert drivers, [cmdline(p) for p in pids]
    for pid in pids:
        env = environ(pid)
        assert not [k for k in env if k.startswith("THINKFORGE_")], (cmdline(pid), env.keys())
        assert not [v for v in env.values() if SECRET_KEY in v or API_KEY in v]
        assert SECRET_KEY not in cmdline(pid) and API_KEY not in cmdline(pid)
    for pid in drivers:
        assert mlflow_uri not in cmdline(pid)
    driver_env = environ(drivers[0])
    if os.environ.get("PYTHONPATH"):  # a checkout on the path (not an install) reaches jobs
        repo = str(Path(__file__).resolve().parents[2])
        assert repo in driver_env.get("PYTHONPATH", "").split(os.pathsep)
    assert driver_env["MLFLOW_TRACKING_URI"] == mlflow_uri


def test_a_killed_embedded_control_plane_reattaches_and_the_job_registers_once(
    data_dir: Path, tmp_path: Path
) -> None:
    env = embedded_env(data_dir)
    mlflow_uri = f"sqlite:///{data_dir / 'mlflow.db'}"
    first = ControlPlane(data_dir, None, **env).start(timeout_s=240)
    try:
        with first.client() as client:
            file_id = upload_sums(client, tmp_path)
            job = create_job(client, file_id, n_epochs=1, max_steps=8)
            wait_job(client, job["id"], lambda j: j["status"] == "running", timeout=240)
            record = read_head(data_dir / RAY_HEAD_FILE)
            assert record is not None
            check_ray_processes(record.pid, mlflow_uri)
    finally:
        first.kill()  # like a crash: the head, in its own session, lives on
    assert stat.S_IMODE((data_dir / RAY_HEAD_FILE).stat().st_mode) == 0o600
    assert json.loads((data_dir / RAY_HEAD_FILE).read_text())["token"] == record.token
    second = ControlPlane(data_dir, None, **env).start(timeout_s=120)
    try:
        with second.client() as client:
            done = wait_job(client, job["id"], lambda j: j["status"] in TERMINAL, timeout=400)
            assert done["status"] == "succeeded", done["error"]
            assert done["fine_tuned_model"] == "sums-e2e/1"
            from ray.job_submission import JobSubmissionClient

            ray = JobSubmissionClient(
                record.dashboard_url, headers={"Authorization": f"Bearer {record.token}"}
            )
            assert [j.submission_id for j in ray.list_jobs()] == [job["id"]]
    finally:
        second.stop()  # a clean stop ends the head it reattached to
    assert "reattached to the local Ray head" in second.log.read_text()
    versions = MlflowClient(tracking_uri=mlflow_uri).search_model_versions("name='sums-e2e'")
    assert [str(v.version) for v in versions] == ["1"]
    assert not (data_dir / RAY_HEAD_FILE).exists()
    assert descendants(record.pid) == [record.pid] and not cmdline(record.pid)


def wait_gone(pids: list[int], timeout_s: float) -> float:
    """Seconds until none of ``pids`` runs any more; fails naming the ones that still do."""
    started = time.monotonic()
    while alive := [p for p in pids if cmdline(p)]:
        assert time.monotonic() - started < timeout_s, [cmdline(p) for p in alive]
        time.sleep(0.2)
    return time.monotonic() - started


def training_starts(head: HeadRecord, job_id: str) -> list[int]:
    """The step each training attempt of the job started from, from its driver's log."""
    from ray.job_submission import JobSubmissionClient

    ray = JobSubmissionClient(head.dashboard_url, headers={"Authorization": f"Bearer {head.token}"})
    lines = ray.get_job_logs(job_id).splitlines()
    found = [parse_event(line[line.find(EVENT_PREFIX) :]) for line in lines if EVENT_PREFIX in line]
    return [int(e["step"]) for e in found if e and e["event"] == "training_started"]


def test_a_run_lost_with_its_ray_head_resumes_from_its_last_checkpoint(
    data_dir: Path, tmp_path: Path
) -> None:
    """The control plane and its Ray head both die mid-job (a machine restart, say), right
    after the first checkpoint is written (Ray Train may not have recorded it yet); the next
    start begins a new head, which has no record of the run: the job is resubmitted and
    resumes from the last checkpoint on storage instead of ending as job_lost, and MLflow
    holds each step once."""
    env, steps = embedded_env(data_dir), 48
    first = ControlPlane(data_dir, None, **env).start(timeout_s=240)
    try:
        with first.client() as client:
            job = create_job(client, upload_sums(client, tmp_path), n_epochs=6)
            deadline = time.monotonic() + 300
            while latest_checkpoint(data_dir / "checkpoints", job["id"]) is None:
                assert time.monotonic() < deadline, "no checkpoint was written"
                time.sleep(0.1)
        record = read_head(data_dir / RAY_HEAD_FILE)
        assert record is not None
        old = descendants(record.pid)  # the run's driver and workers among them
        os.killpg(record.pid, signal.SIGKILL)  # the head dies and takes the run with it
    finally:
        first.kill()
    lost = latest_checkpoint(data_dir / "checkpoints", job["id"])
    assert lost is not None and lost.step < steps
    # Workers outside the head's process group notice the lost raylet and exit; none may
    # go on training (and logging) beside the resubmitted run.
    print(f"the old head's processes were all gone {wait_gone(old, 60):.1f} s after the kill")
    second = ControlPlane(data_dir, None, **env).start(timeout_s=240)
    try:
        with second.client() as client:
            done = wait_job(client, job["id"], lambda j: j["status"] in TERMINAL, timeout=400)
            assert done["status"] == "succeeded", done["error"]
            assert done["retries"] == 1 and done["fine_tuned_model"] == "sums-e2e/1"
            (retry,) = [e for e in events(client, job["id"]) if e["type"] == "retry"]
        head = read_head(data_dir / RAY_HEAD_FILE)
        assert head is not None
        started = training_starts(head, job["id"])
    finally:
        second.stop()
    resumed = int(retry["data"]["checkpoint_step"])  # the last complete one when it was lost
    assert lost.step <= resumed < steps
    assert started == [resumed]  # where the event says, not from step 1
    assert "the local Ray head of an earlier run is gone" in second.log.read_text()
    mlflow = MlflowClient(tracking_uri=f"sqlite:///{data_dir / 'mlflow.db'}")
    points = mlflow.get_metric_history(done["mlflow_run_id"], "loss")
    assert sorted(int(p.step) for p in points) == list(range(1, steps + 1))  # each step once
    data = mlflow.get_metric_history(done["mlflow_run_id"], f"{DATA_METRIC_PREFIX}trained_tokens")
    assert [int(p.step) for p in data] == [0]
