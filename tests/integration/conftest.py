"""Integration fixtures: a real local Ray head (token auth), the control plane as a process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from thinkforge.platform.ray_cluster import LocalRayCluster

API_KEY = "tf-integration-key-0123456789abcdef0123"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRayCluster]:
    log = tmp_path_factory.mktemp("ray") / "head.log"
    cluster = LocalRayCluster(
        num_cpus=2, dashboard_port=free_port(), gcs_port=free_port(), log_path=log
    )
    with cluster:
        yield cluster


class ControlPlane:
    """``thinkforge up`` in a subprocess, so a test can kill it like a crash would."""

    def __init__(self, data_dir: Path, cluster: LocalRayCluster | None, **env: str) -> None:
        """``cluster=None``: embedded mode, the control plane starts its own Ray head."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ray = (
            {
                "THINKFORGE_RAY_ADDRESS": cluster.dashboard_url,
                "THINKFORGE_RAY_AUTH_TOKEN": cluster.token,
            }
            if cluster is not None
            else {}
        )
        self.env = {
            **os.environ,
            "THINKFORGE_DATA_DIR": str(data_dir),
            **ray,
            "THINKFORGE_BOOTSTRAP_API_KEY": API_KEY,
            "THINKFORGE_RECONCILE_INTERVAL_S": "1",
            "THINKFORGE_RECIPES_DIR": str(Path(__file__).resolve().parents[2] / "recipes"),
            **env,
        }
        self.log = data_dir / f"api-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 180) -> ControlPlane:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "thinkforge.cli", "up", "--port", str(self.port)],
            env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )  # fmt: skip
        deadline, last = time.monotonic() + timeout_s, ""
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                resp = httpx.get(f"{self.url}/readyz", timeout=10)
                if resp.status_code == 200:
                    return self
                last = resp.text
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.kill()
        raise AssertionError(f"control plane not ready ({last}):\n{self.log.read_text()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
        )


def serving_plane(
    data_dir: Path, cluster: LocalRayCluster, serve_port: int | None = None
) -> tuple[ControlPlane, int]:
    """The control plane (started) with Serve's front door on a free port, replicas at
    half a CPU; returns it and the front door's port. Serve keeps the port it first
    started with for the cluster's life: a module's later planes pass the same one."""
    serve_port = serve_port or free_port()
    plane = ControlPlane(
        data_dir,
        cluster,
        THINKFORGE_SERVE_PORT=str(serve_port),
        THINKFORGE_SERVE_REPLICA_CPUS="0.5",
    )
    return plane.start(), serve_port
