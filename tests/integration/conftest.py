"""Integration fixtures: a real local Ray head (token auth), the control plane as a process.

Shared fixtures a new integration module should use rather than start its own:

- ``ray_cluster`` (package scope): one local Ray head, 2 CPUs, token auth, for every module
  of this package that asks for it. A head costs ~25 s to start and stop on the CI machine.
  Modules that ask for it run after the ones that do not (``pytest_collection_modifyitems``
  below), so it is never idle beside the embedded-mode tests' own heads.
- Ray Serve on it is cleared after each module (``serve_cleared_after_module``): a module's
  deployments, which hold part of the 2 CPUs, never reach the next module. Jobs are not
  cleared: every test waits for its jobs to end, and reads them back by submission id.
- ``serve_port`` / ``serve_port_of(cluster)``: Serve keeps the HTTP port of its first
  start for the cluster's life, so every control plane on the shared head must pass the
  same one; ``serving_plane`` does so by itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, seed_mlflow_store
from thinkforge.platform.ray_cluster import LocalRayCluster

API_KEY = "tf-integration-key-0123456789abcdef0123"


_SERVE_PORTS: dict[str, int] = {}  # dashboard URL -> the Serve port of that cluster
_SHARED: list[LocalRayCluster] = []  # the package's head while it is up


def serve_port_of(cluster: LocalRayCluster) -> int:
    """The one Serve HTTP port of ``cluster``, picked on first use."""
    return _SERVE_PORTS.setdefault(cluster.dashboard_url, free_port())


@pytest.fixture(scope="package")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRayCluster]:
    log = tmp_path_factory.mktemp("ray") / "head.log"
    cluster = LocalRayCluster(
        num_cpus=2, dashboard_port=free_port(), gcs_port=free_port(), log_path=log
    )
    with cluster:
        _SHARED.append(cluster)
        try:
            yield cluster
        finally:
            _SHARED.remove(cluster)


@pytest.fixture(scope="package")
def serve_port(ray_cluster: LocalRayCluster) -> int:
    return serve_port_of(ray_cluster)


def clear_serve(cluster: LocalRayCluster, timeout_s: float = 120) -> None:
    """Shut Serve down on ``cluster`` (every application, the proxy and the controller)
    and wait until its port is free; the next control plane's config starts it afresh."""
    headers = {"Authorization": f"Bearer {cluster.token}"}
    url = f"{cluster.dashboard_url}/api/serve/applications/"
    resp = httpx.delete(url, headers=headers, timeout=timeout_s)
    assert resp.status_code == 200, resp.text
    deadline = time.monotonic() + timeout_s
    port = _SERVE_PORTS.get(cluster.dashboard_url)
    while httpx.get(url, headers=headers, timeout=30).json().get("applications") or (
        port is not None and _listening(port)
    ):
        assert time.monotonic() < deadline, "Serve did not shut down"
        time.sleep(0.5)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module", autouse=True)
def serve_cleared_after_module() -> Iterator[None]:
    yield
    for cluster in _SHARED:
        clear_serve(cluster)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules on the shared head run after the rest of this package (whole modules, in
    their own order), so that the head starts once the embedded-mode tests are done."""
    here = Path(__file__).parent
    shared: set[Path] = set()
    for item in items:
        if item.path.parent == here and "ray_cluster" in getattr(item, "fixturenames", ()):
            shared.add(item.path)

    slots = [i for i, item in enumerate(items) if item.path.parent == here]
    ours = sorted((items[i] for i in slots), key=lambda item: item.path in shared)
    for i, item in zip(slots, ours, strict=True):
        items[i] = item


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
        if cluster is not None and "THINKFORGE_MLFLOW_TRACKING_URI" not in env:
            # Its default MLflow store, migrated already (the embedded-mode tests open
            # new ones).
            seed_mlflow_store(data_dir / "mlflow.db")

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
    """The control plane (started) with Serve's front door on the cluster's Serve port,
    replicas at half a CPU; returns it and the front door's port. Serve keeps the port it
    first started with for the cluster's life, so every plane on a cluster uses one."""
    serve_port = serve_port or serve_port_of(cluster)
    plane = ControlPlane(
        data_dir,
        cluster,
        THINKFORGE_SERVE_PORT=str(serve_port),
        THINKFORGE_SERVE_REPLICA_CPUS="0.5",
    )
    return plane.start(), serve_port
