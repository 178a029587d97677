"""RayJobLauncher: each fine-tune job is one Ray Job whose submission id is the job id
(a resumed job's later runs: ``TrainingLaunch.submission``, see ``jobs.submission_id``).

Submitting twice is harmless (Ray refuses the duplicate id, and that counts as done), so
the API and the reconciler may both try. The driver runs ``python -m thinkforge.jobs``,
which starts a ``TorchTrainer`` named after the job.

A training run counts as running once its workers are placed (its placement group is
created); until then it is PENDING and says what it waits for, from the dashboard's
state API. A run larger than the whole cluster is refused at submission (``CannotFit``),
unless the cluster autoscales.

    launcher = RayJobLauncher("http://127.0.0.1:8265", token=..., mlflow_tracking_uri=..., ...)
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
from collections.abc import Callable
from typing import Any

import httpx

from thinkforge.contract import find_error as job_error_line
from thinkforge.jobs.config import Resources
from thinkforge.platform.launcher import (
    CannotFit,
    LaunchSpec,
    LaunchState,
    LaunchStatus,
    ModuleLaunch,
    TrainingLaunch,
)

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
        autoscaling: bool = False,
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
        self.autoscaling = autoscaling
        self._client: Any = None
        self._lock = threading.Lock()
        self._placed: set[str] = set()  # jobs whose workers were placed once
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=dashboard_url, headers=headers, timeout=10)

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
            "--storage-path", self.storage_path,
            "--data-dir", self.data_dir,
        ]  # fmt: skip
        if self.mlflow_artifact_root:
            args += ["--mlflow-artifact-root", self.mlflow_artifact_root]
        return shlex.join(args)

    def submit(self, spec: LaunchSpec) -> None:
        client = self.client()
        metadata = {"thinkforge_job_id": spec.job_id}
        if isinstance(spec, TrainingLaunch):  # its workers take the resources
            ask = asked(spec)
            if not self.autoscaling:
                self._check_fits(ask)
            metadata["thinkforge_ask"] = json.dumps(ask)
        try:
            client.submit_job(
                entrypoint=self.entrypoint(spec),
                submission_id=spec.submission_id,
                # The MLflow URI may hold credentials: off the entrypoint (Ray still puts
                # the runtime env on its workers' command lines: docs/production.md).
                runtime_env={
                    "env_vars": {
                        **self.env,
                        "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
                        **_run_env(spec),
                    }
                },
                metadata=metadata,
                # The driver only coordinates; the training workers hold the resources.
                entrypoint_num_cpus=0,
            )
        except RuntimeError as exc:
            if "already exists" in str(exc) or "already been submitted" in str(exc):
                log.info("job %s was already submitted", spec.submission_id)
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
        ask = (info.metadata or {}).get("thinkforge_ask")
        if state is LaunchState.RUNNING and ask and job_id not in self._placed:
            waiting = self._placement(job_id, str(info.job_id), json.loads(ask))
            if waiting is not None:
                return waiting
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

    # ------------------------------------------------------------ resources

    def _state(self, path: str) -> Any:
        resp = self._http.get(path)
        resp.raise_for_status()
        return resp.json()["data"]

    def _listing(self, kind: str) -> list[dict[str, Any]]:
        data = self._state(f"/api/v0/{kind}?detail=true&limit=10000")
        return list(data["result"]["result"])

    def _check_fits(self, ask: dict[str, Any]) -> None:
        try:
            nodes = [n["resources_total"] for n in self._listing("nodes") if n["state"] == "ALIVE"]
        except (httpx.HTTPError, KeyError, ValueError):  # unknown: let Ray decide
            log.warning("could not read the cluster's nodes; submitting without a size check")
            return
        if not nodes:  # a head still registering itself: no size known yet
            return
        per, workers = ask["per_worker"], int(ask["workers"])
        total = _sum(nodes)
        need = {k: v * workers for k, v in per.items()}
        one_fits = any(all(node.get(k, 0) >= v for k, v in per.items()) for node in nodes)
        if one_fits and all(total.get(k, 0) >= v for k, v in need.items()):
            return
        raise CannotFit(
            f"the job asks for {workers} workers with {_show(per)} each ({_show(need)} in all), "
            f"but the whole cluster has {_show(total, per)} on {len(nodes)} node(s), so it "
            "can never start; ask for fewer workers or less per worker"
        )

    def _placement(self, job_id: str, ray_job_id: str, ask: dict[str, Any]) -> LaunchStatus | None:
        """None once the run's workers are placed; else PENDING, saying what it waits for."""
        try:
            groups = self._listing("placement_groups")
            ours = [g for g in groups if g.get("creator_job_id") == ray_job_id]
            if any(g["state"] == "CREATED" for g in ours):
                self._placed.add(job_id)
                return None
            if not any(g["state"] == "PENDING" for g in ours):
                return LaunchStatus(LaunchState.PENDING)  # still checking its data and model
            usage = self._state("/api/cluster_status")["clusterStatus"]["loadMetricsReport"]
            held_by = self._holders(groups, ray_job_id)
        except (httpx.HTTPError, KeyError, ValueError):
            log.warning("job %s: could not read where its workers stand", job_id, exc_info=True)
            return None
        keys = set(ask["per_worker"]) | {"CPU"}
        total = {k: float(v[1]) for k, v in usage["usage"].items() if k in keys}
        free = {k: float(v[1] - v[0]) for k, v in usage["usage"].items() if k in keys}
        waiting = {"asked": ask, "free": free, "total": total, "held_by": held_by}
        holders = "; ".join(f"{h['holder']} ({_show(h['resources'])})" for h in held_by)
        message = (
            f"Waiting for workers: asks {ask['workers']} x {_show(ask['per_worker'])}; "
            f"free {_show(free)} of {_show(total)}; held by {holders or 'nothing we can see'}"
        )
        return LaunchStatus(LaunchState.PENDING, message=message, waiting=waiting)

    def _holders(self, groups: list[dict[str, Any]], ray_job_id: str) -> list[dict[str, Any]]:
        """Who holds CPUs and GPUs now: other jobs' placed workers, Serve replicas, actors."""
        names = {str(j.job_id): j.submission_id for j in self.client().list_jobs() if j.job_id}
        held: dict[str, dict[str, float]] = {}

        def add(holder: str, resources: dict[str, float]) -> None:
            mine = {k: float(v) for k, v in resources.items() if k in ("CPU", "GPU") and v}
            for k, v in mine.items():
                held.setdefault(holder, {}).setdefault(k, 0.0)
                held[holder][k] += v

        for g in groups:
            if g["state"] == "CREATED" and g.get("creator_job_id") != ray_job_id:
                owner = (
                    names.get(g.get("creator_job_id", "")) or f"Ray job {g.get('creator_job_id')}"
                )
                for bundle in g.get("bundles") or []:
                    add(f"job {owner}", bundle.get("unit_resources") or {})
        for a in self._listing("actors"):
            if a["state"] != "ALIVE" or a.get("placement_group_id"):
                continue
            add(_actor_holder(a, names), a.get("required_resources") or {})
        return [{"holder": k, "resources": v} for k, v in sorted(held.items())]


def asked(spec: TrainingLaunch) -> dict[str, Any]:
    """What the run's workers ask for, from its config: {"workers", "per_worker"}."""
    res = Resources.model_validate(spec.config.get("resources") or {})
    per = {"CPU": float(res.cpus_per_worker)}
    if res.gpus_per_worker:
        per["GPU"] = float(res.gpus_per_worker)
    return {"workers": res.num_workers, "per_worker": per}


def _actor_holder(actor: dict[str, Any], names: dict[str, str | None]) -> str:
    cls = str(actor.get("class_name") or "actor")
    if cls.startswith("ServeReplica:"):
        _, app, deployment = [*cls.split(":", 2), "", ""][:3]
        return f"Serve deployment {deployment} of app {app}"
    owner = names.get(str(actor.get("job_id"))) or f"Ray job {actor.get('job_id')}"
    return f"actor {cls} of {owner}"


def _sum(items: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        for k, v in item.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def _show(resources: dict[str, float], keys: dict[str, float] | None = None) -> str:
    shown = {k: v for k, v in resources.items() if k in (keys or {"CPU": 1, "GPU": 1})}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(shown.items())) or "nothing"


def _run_env(spec: LaunchSpec) -> dict[str, str]:
    return dict(spec.env) if isinstance(spec, ModuleLaunch) else {}
