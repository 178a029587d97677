"""A local Ray head for the embedded stack and for tests: started, found, and stopped cleanly.

``ray start --head --block`` runs in its own process group, so stopping it ends exactly
this cluster's processes (not every Ray process on the machine, as ``ray stop`` would).

    with LocalRayCluster(num_cpus=2) as cluster:
        launcher = RayJobLauncher(cluster.dashboard_url, token=cluster.token)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from thinkforge.platform.health import Down


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def dashboard_alive(url: str, token: str | None = None) -> bool:
    try:
        resp = httpx.get(f"{url}/api/version", headers=auth_headers(token), timeout=2)
    except httpx.HTTPError:
        return False
    return resp.status_code == 200


class LocalRayCluster:
    def __init__(
        self,
        *,
        num_cpus: int | None = None,
        dashboard_port: int = 8265,
        gcs_port: int = 6379,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        token: str | None = None,
    ) -> None:
        self.num_cpus = num_cpus
        self.dashboard_port = dashboard_port
        self.gcs_port = gcs_port
        self.log_path = log_path
        self.env = env or {}
        # Token auth always: the dashboard's job API runs arbitrary code (ShadowRay).
        self.token = token or secrets.token_hex(24)
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self.gcs_address = f"127.0.0.1:{gcs_port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._up = threading.Event()
        self._error: BaseException | None = None

    def start_in_background(self) -> None:
        """Start without blocking; users call ``wait_until_up`` before they need the cluster."""

        def run() -> None:
            try:
                self.start()
            except BaseException as exc:  # kept for wait_until_up to raise in the caller
                self._error = exc
                self._up.set()

        threading.Thread(target=run, name="ray-head-start", daemon=True).start()

    def wait_until_up(self, timeout_s: float = 300) -> None:
        if not self._up.wait(timeout_s):
            raise RuntimeError(f"the local Ray cluster did not start within {timeout_s}s")
        if self._error is not None:
            raise RuntimeError(f"the local Ray cluster failed to start: {self._error}")

    def check(self) -> None:
        """Readiness: raises ``Down`` while the head starts, after it failed, or when its
        dashboard stops answering."""
        if not self._up.is_set():
            raise Down("the local Ray cluster is starting")
        if self._error is not None:
            raise Down("the local Ray cluster failed to start; see ray-head.log")
        if not dashboard_alive(self.dashboard_url, self.token):
            raise Down("the local Ray head does not answer")

    def start(self, timeout_s: float = 180) -> LocalRayCluster:
        bindir = str(Path(sys.executable).parent)
        cmd = [
            os.path.join(bindir, "ray"), "start", "--head", "--block", "--disable-usage-stats",
            f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
            "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--node-ip-address=127.0.0.1",
            # Fixed defaults (10001, 52365) would collide with a second cluster on this machine.
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        ]  # fmt: skip
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        # Job drivers inherit this PATH, so `python -m thinkforge.jobs` is this environment's.
        env = {
            **os.environ,
            **self.env,
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
        }
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while not dashboard_alive(self.dashboard_url, self.token):
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"ray start exited with {self._proc.returncode}; see {self.log_path}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Ray dashboard at {self.dashboard_url} did not come up")
            time.sleep(0.5)
        self._up.set()
        return self

    def stop(self, timeout_s: float = 10) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        pgid = os.getpgid(proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the group goes too
            os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
