"""A local Ray head for the embedded stack and for tests: started, found, and stopped cleanly.

``ray start --head --block`` runs in its own process group, so stopping it ends exactly
this cluster's processes (not every Ray process on the machine, as ``ray stop`` would).
It also outlives a control plane that is killed: the embedded stack keeps the head's
address, token and process in ``ray-head.json`` in its data directory (mode 0600), and
the next start reattaches to it, or stops it and says so when it no longer answers.

    with LocalRayCluster(num_cpus=2) as cluster:
        launcher = RayJobLauncher(cluster.dashboard_url, token=cluster.token)
    cluster = LocalRayCluster.in_data_dir(data_dir / "ray-head.json", num_cpus=2)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from thinkforge.platform.health import Down

log = logging.getLogger(__name__)
# Ray processes get this environment minus the control plane's own settings: its secret
# key, bootstrap key and database URL are no business of the jobs that run there.
PRIVATE_ENV_PREFIX = "THINKFORGE_"
RAY_HEAD_FILE = "ray-head.json"


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


@dataclass(frozen=True)
class HeadRecord:
    """What the next start needs to find this head again, and to know it is this head."""

    dashboard_url: str
    gcs_address: str
    token: str
    pid: int
    cmdline: list[str]


def write_head(path: Path, record: HeadRecord) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(record), fh)
    os.chmod(tmp, 0o600)  # also when the file was there already, with other bits
    os.replace(tmp, path)


def read_head(path: Path) -> HeadRecord | None:
    try:
        return HeadRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def previous_head(path: Path) -> HeadRecord | None:
    """The head an earlier run left behind, if it still answers; one that does not is
    stopped (when it is still the process the record names) and forgotten."""
    record = read_head(path)
    if record is None:
        return None
    if dashboard_alive(record.dashboard_url, record.token):
        log.info(
            "reattached to the local Ray head (pid %s, %s) that an earlier run started",
            record.pid, record.dashboard_url,
        )  # fmt: skip
        return record
    if _cmdline(record.pid) == record.cmdline:
        log.warning(
            "the local Ray head an earlier run started (pid %s) does not answer: stopped "
            "it; starting a new one", record.pid,
        )  # fmt: skip
        stop_group(record.pid)
    else:
        log.info("the local Ray head of an earlier run is gone; starting a new one")
    path.unlink(missing_ok=True)
    return None


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_group(pgid: int, timeout_s: float = 10) -> None:
    """SIGTERM to the process group, SIGKILL to whatever is left after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _group_alive(pgid):
            return


def ray_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for Ray processes, without the control plane's secrets;
    PATH leads with this interpreter's folder, so drivers run this environment's Python."""
    bindir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(PRIVATE_ENV_PREFIX)}
    env.update(extra or {})
    env["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    return env


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
        state_path: Path | None = None,
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
        self.state_path = state_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._adopted: int | None = None  # the pid of a head an earlier run started
        self._up = threading.Event()
        self._error: BaseException | None = None

    @classmethod
    def in_data_dir(cls, state_path: Path, **kwargs: object) -> LocalRayCluster:
        """The head recorded at ``state_path`` if it still answers, else a new one (not yet
        started) that records itself there."""
        cluster = cls(state_path=state_path, **kwargs)  # type: ignore[arg-type]
        record = previous_head(state_path)
        if record is not None:
            cluster.dashboard_url, cluster.gcs_address = record.dashboard_url, record.gcs_address
            cluster.token, cluster._adopted = record.token, record.pid
            cluster._up.set()
        return cluster

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
        if self._adopted is not None:
            return self
        bindir = str(Path(sys.executable).parent)
        cmd = [
            os.path.join(bindir, "ray"), "start", "--head", "--block", "--disable-usage-stats",
            f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
            "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--node-ip-address=127.0.0.1",
            # Fixed defaults (10001, 52365) would collide with a second cluster on this machine.
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            # Its own temp dir: a job's driver finds "its" cluster through the temp dir's
            # ray_current_cluster, which under the shared /tmp/ray names the newest cluster
            # on the machine, whichever that is. Short, for Ray's socket paths.
            f"--temp-dir={tempfile.mkdtemp(prefix='ray-')}",
        ]  # fmt: skip
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        # Job drivers inherit this PATH, so `python -m thinkforge.jobs` is this environment's.
        env = ray_environment({**self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token})
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
        if self.state_path is not None:
            record = HeadRecord(
                self.dashboard_url, self.gcs_address, self.token, self._proc.pid, cmd
            )
            write_head(self.state_path, record)
        self._up.set()
        return self

    def stop(self, timeout_s: float = 10) -> None:
        proc, self._proc = self._proc, None
        adopted, self._adopted = self._adopted, None
        if self.state_path is not None:
            self.state_path.unlink(missing_ok=True)
        if adopted is not None:
            stop_group(adopted, timeout_s)
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
