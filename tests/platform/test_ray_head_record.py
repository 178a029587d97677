"""The record of the embedded Ray head (ray-head.json): private to its owner, and a head
that no longer answers is stopped, but only when it is still the process recorded."""

from __future__ import annotations

import logging
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from thinkforge.platform.ray_cluster import HeadRecord, previous_head, read_head, write_head


def sleeper() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True
    )
    deadline = time.monotonic() + 10
    while b"time.sleep" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


def record_for(pid: int, cmdline: list[str]) -> HeadRecord:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing answers there
    return HeadRecord(dead, "127.0.0.1:1", "token-1", pid, cmdline)


def test_an_unanswering_head_of_an_earlier_run_is_stopped_and_said_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proc = sleeper()
    try:
        path = tmp_path / "ray-head.json"
        path.write_text("{}")
        path.chmod(0o644)
        record = record_for(proc.pid, [sys.executable, "-c", "import time; time.sleep(300)"])
        write_head(path, record)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and read_head(path) == record
        with caplog.at_level(logging.INFO):
            assert previous_head(path) is None
        assert proc.wait(timeout=15) == -signal.SIGTERM
        assert f"(pid {proc.pid}) does not answer: stopped it" in caplog.text
        assert not path.exists()
    finally:
        proc.kill()
        proc.wait()


def test_a_recorded_pid_now_held_by_another_process_is_left_alone(tmp_path: Path) -> None:
    proc = sleeper()
    try:
        path = tmp_path / "ray-head.json"
        write_head(path, record_for(proc.pid, ["/venv/bin/ray", "start", "--head", "--block"]))
        assert previous_head(path) is None
        assert proc.poll() is None and not path.exists()
    finally:
        proc.kill()
        proc.wait()
