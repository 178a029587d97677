"""RayJobLauncher: each fine-tune job is one Ray Job whose submission id is the job id.

Submitting twice is harmless (Ray refuses the duplicate id, and that counts as done), so
the API and the reconciler may both try. The driver runs ``python -m thinkforge.jobs``,
which starts a ``TorchTrainer`` named after the job.

    launcher = RayJobLauncher("http://127.0.0.1:8265", token=..., mlflow_tracking_uri=..., ...)
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
from collections.abc import Callable
from typing import Any

from thinkforge.contract import find_error as job_error_line
from thinkforge.platform.launcher import LaunchSpec, LaunchState, LaunchStatus, ModuleLaunch

log = logging.getLogger(__name__)
LOG_TAIL_CHARS = 4000


class RayJobLauncher:
    def __init__(
        self,
        dashboard_url: str,
        *,
        token: str | None = None,
        mlflow_tracking_uri: str,
        mlflow_artifact_root: str = "",
        storage_path: str,
        data_dir: str,
        python: str = "python",
        env: dict[str, str] | None = None,
        wait_ready: Callable[[], None] | None = None,
    ) -> None:
        self.dashboard_url = dashboard_url
        self.token = token
        self.mlflow_tracking_uri = mlflow_tracking_uri
        self.mlflow_artifact_root = mlflow_artifact_root
        self.storage_path = storage_path
        self.data_dir = data_dir
        self.python = python
        self.env = env or {}
        self._wait_ready = wait_ready
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        if self._wait_ready is not None:
            self._wait_ready()
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
                self._client = JobSubmissionClient(self.dashboard_url, headers=headers)
            return self._client

    def entrypoint(self, spec: LaunchSpec) -> str:
        if isinstance(spec, ModuleLaunch):
            return shlex.join([self.python, "-m", spec.module, *spec.args])
        args = [
            self.python, "-m", "thinkforge.jobs",
            "--job-id", spec.job_id,
            "--config-json", json.dumps(spec.config, separators=(",", ":")),
            "--mlflow-uri", self.mlflow_tracking_uri,
            "--storage-path", self.storage_path,
            "--data-dir", self.data_dir,
        ]  # fmt: skip
        if self.mlflow_artifact_root:
            args += ["--mlflow-artifact-root", self.mlflow_artifact_root]
        return shlex.join(args)

    def submit(self, spec: LaunchSpec) -> None:
        client = self.client()
        try:
            client.submit_job(
                entrypoint=self.entrypoint(spec),
                submission_id=spec.job_id,
                runtime_env={"env_vars": dict(self.env)},
                metadata={"thinkforge_job_id": spec.job_id},
                # The driver only coordinates; the training workers hold the resources.
                entrypoint_num_cpus=0,
            )
        except RuntimeError as exc:
            if "already exists" in str(exc) or "already been submitted" in str(exc):
                log.info("job %s was already submitted", spec.job_id)
                return
            raise

    def cancel(self, job_id: str) -> None:
        try:
            self.client().stop_job(job_id)
        except RuntimeError as exc:
            if "does not exist" not in str(exc):
                raise

    def status(self, job_id: str) -> LaunchStatus:
        client = self.client()
        try:
            info = client.get_job_info(job_id)
        except RuntimeError as exc:
            if "does not exist" in str(exc):
                return LaunchStatus(LaunchState.UNKNOWN)
            raise
        state = LaunchState(
            str(info.status.value if hasattr(info.status, "value") else info.status)
        )
        message, tail = info.message, None
        if state is LaunchState.FAILED:
            try:
                tail = client.get_job_logs(job_id)[-LOG_TAIL_CHARS:]
            except RuntimeError:
                tail = None
            message = job_error_line(tail) or message
        return LaunchStatus(state, message=message, log_tail=tail)

    def submission_count(self, job_id: str) -> int:
        """How many Ray jobs carry this job id (for checks that nothing ran twice)."""
        jobs = self.client().list_jobs()
        return sum(1 for j in jobs if (j.metadata or {}).get("thinkforge_job_id") == job_id)
