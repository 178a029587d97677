"""Run a real ``mlflow server`` (tracking + registry + artifact proxy) as a child process.

Tests use it to exercise the registry against the same server production runs; in
production the same command line (``MlflowServer(...).command()``) is what the
container or systemd unit starts::

    with MlflowServer("postgresql://mlflow@db/mlflow", "s3://bucket/mlflow", port=5000) as srv:
        registry = MlflowRegistry(srv.url)

The server proxies artifacts (``--serve-artifacts``): clients upload and download
through ``mlflow-artifacts:/`` URIs and need no credentials for the artifact store.
``postgresql://`` URIs are rewritten to the psycopg 3 driver, the one installed. The
server runs in its own process group, so stopping it also stops its uvicorn worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

__all__ = ["MlflowServer", "MlflowServerError", "sqlalchemy_uri"]


class MlflowServerError(RuntimeError):
    """The server did not start; the message carries the tail of its log."""


def sqlalchemy_uri(uri: str) -> str:
    """``postgresql://`` -> ``postgresql+psycopg://`` (psycopg2 is not installed)."""
    for prefix in ("postgresql://", "postgres://"):
        if uri.startswith(prefix):
            return "postgresql+psycopg://" + uri.removeprefix(prefix)
    return uri


def _artifact_uri(destination: str | Path) -> str:
    text = str(destination)
    return text if "://" in text else str(Path(text).resolve())


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the group; False when no process is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


class MlflowServer:
    """``mlflow server`` on ``host:port``, started on enter and stopped on exit."""

    def __init__(
        self,
        backend_store_uri: str,
        artifacts_destination: str | Path,
        host: str = "127.0.0.1",
        port: int = 5000,
        *,
        workers: int = 1,
        allowed_hosts: list[str] | None = None,
        job_execution: bool = False,
        startup_timeout_s: float = 120.0,
        log_path: str | Path | None = None,
    ) -> None:
        self.backend_store_uri = sqlalchemy_uri(backend_store_uri)
        self.artifacts_destination = _artifact_uri(artifacts_destination)
        self.host = host
        self.port = port
        self.workers = workers
        self.allowed_hosts = allowed_hosts
        self.job_execution = job_execution
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self.startup_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        argv = [sys.executable, "-m", "mlflow", "server"]
        argv += ["--backend-store-uri", self.backend_store_uri]
        argv += ["--serve-artifacts", "--artifacts-destination", self.artifacts_destination]
        argv += ["--host", self.host, "--port", str(self.port), "--workers", str(self.workers)]
        if self.allowed_hosts:
            argv += ["--allowed-hosts", ",".join(self.allowed_hosts)]
        return argv

    def environment(self) -> dict[str, str]:
        """The server's environment: ours, plus whether MLflow runs its background jobs.

        Those jobs (huey consumers, seven processes) serve GenAI features the platform does
        not use; off, the server starts faster and holds less memory.
        """
        env = dict(os.environ)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "true" if self.job_execution else "false"
        return env

    def start(self) -> None:
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="mlflow-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,  # its own process group: stop() reaches the workers
            )
        try:
            self._wait_healthy(started + self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started

    def _wait_healthy(self, deadline: float) -> None:
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise MlflowServerError(
                    f"mlflow server exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise MlflowServerError(
            f"mlflow server at {self.url} was not healthy after {self.startup_timeout_s:.0f}s:\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left after ``timeout_s``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not _signal_group(proc.pid, sig):
                break
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and _signal_group(proc.pid, 0):
                proc.poll()  # reap the leader, else its zombie keeps the group alive
                time.sleep(0.1)
            if not _signal_group(proc.pid, 0):
                break
        proc.wait(timeout=timeout_s)

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
