"""Reads a run's progress back into the database: metrics to events, checkpoints to rows,
the registered version to ``fine_tuned_model``, the measured step time to
``estimated_finish``, and, once the run registered its model, the per-step metrics to a
downloadable CSV file (``result_files``, as OpenAI's jobs have). Used by the reconciler on
every pass.

MLflow and the checkpoint store are asked again each time; rows are written once
(events by a dedupe key, checkpoints by (job, step)), so any number of passes, or a
restarted control plane, records each thing exactly once.

    tracker = RunTracker(tracking_uri=settings.mlflow_tracking_uri, storage_path=...)
    progress = tracker.fetch(job, final=False)    # MLflow and checkpoints: no transaction
    tracker.apply(session, job, progress)          # the rows: a short one
    png = tracker.run_artifact(job.mlflow_run_id, EXPERTS_PLOT)   # None if not logged
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from thinkforge.contract import (
    BASE_MODEL_TAG,
    DATA_METRIC_PREFIX,
    DATASET_SHA_TAG,
    JOB_TAG,
    LORA_METRIC_PREFIX,
    MOE_STEP_METRICS,
    RECIPE_TAG,
    STEP_METRICS,
    TRAINED_TOKENS,
)
from thinkforge.jobs.checkpoints import list_checkpoints
from thinkforge.platform.errors import Unavailable
from thinkforge.platform.jobs import add_event
from thinkforge.platform.models import Checkpoint, File, Job, JobEvent, ModelVersion, new_id
from thinkforge.platform.paths import CHECKPOINT_REF
from thinkforge.platform.registry import (
    MANIFEST_SHA_TAG,
    MlflowRegistry,
    ModelRegistry,
    ModelVersionDetail,
    ModelVersionInfo,
    all_models,
    all_versions,
)

log = logging.getLogger(__name__)
RESULTS_PURPOSE = "fine-tune-results"  # OpenAI's purpose for a job's result file


@dataclass
class Progress:
    """What one read of MLflow and the checkpoint store found for a job."""

    final: bool
    checkpoints: list[Any] = field(default_factory=list)
    run: Any = None
    history: dict[str, Any] = field(default_factory=dict)
    version: ModelVersionDetail | None = None  # the run's registered version (final only)


class RunTracker:
    def __init__(
        self, *, tracking_uri: str, storage_path: str, files_dir: Path | None = None
    ) -> None:
        self.tracking_uri = tracking_uri
        self.storage_path = storage_path
        self.files_dir = files_dir  # where result files go; none written without it
        self._client: Any = None
        self._registry: MlflowRegistry | None = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(tracking_uri=self.tracking_uri)
            return self._client

    def registry(self) -> MlflowRegistry:
        with self._lock:
            if self._registry is None:
                self._registry = MlflowRegistry(self.tracking_uri)
            return self._registry

    def sync(self, session: Session, job: Job, *, final: bool) -> None:
        self.apply(session, job, self.fetch(job, final=final))

    def fetch(self, job: Job, *, final: bool) -> Progress:
        """Everything MLflow and the checkpoint store say about ``job``: slow (network,
        pyarrow), so the reconciler asks with no database transaction open."""
        checkpoints = list_checkpoints(self.storage_path, job.id)
        run = self._find_run(job)
        if run is None:
            return Progress(final, checkpoints)
        client = self.client()
        keys = STEP_METRICS + tuple(k for k in MOE_STEP_METRICS if k in run.data.metrics)
        history = {key: client.get_metric_history(run.info.run_id, key) for key in keys}
        version = None
        if final:
            found = client.search_model_versions(f"run_id = '{run.info.run_id}'")
            if found:
                newest = max(found, key=lambda v: int(v.version))
                version = self.registry().get_version(newest.name, int(newest.version))
        return Progress(final, checkpoints, run, history, version)

    def apply(self, session: Session, job: Job, progress: Progress) -> None:
        """Write what ``fetch`` found: database work only, for a short transaction."""
        self._sync_checkpoints(session, job, progress.checkpoints)
        run = progress.run
        if run is None:
            log.info("job %s: no MLflow run yet", job.id)
            return
        job.mlflow_run_id = run.info.run_id
        _sync_data_stats(session, job, dict(run.data.metrics))
        _sync_lora_stats(session, job, dict(run.data.metrics))
        self._sync_metrics(session, job, progress.history, final=progress.final)
        job.estimated_finish = None if progress.final else estimate_finish(progress.history)
        if progress.final:
            self._sync_result(session, job, run, progress.version)
            if progress.version is not None and not job.result_files and self.files_dir:
                job.result_files = [write_result_file(session, job, self.files_dir).id]

    def run_artifact(self, run_id: str, path: str) -> bytes | None:
        """One file at the top of a run's artifacts; None when the run (or the file) is
        not there. Unavailable when MLflow cannot be asked."""
        from mlflow.exceptions import MlflowException

        client = self.client()
        try:
            if path not in {a.path for a in client.list_artifacts(run_id)}:
                return None
            with tempfile.TemporaryDirectory(prefix="thinkforge-artifact-") as tmp:
                return Path(client.download_artifacts(run_id, path, tmp)).read_bytes()
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise self._unavailable(exc) from exc
        except OSError as exc:
            raise self._unavailable(exc) from exc

    @staticmethod
    def _unavailable(exc: BaseException) -> Unavailable:
        # MLflow's message names the URI, which may hold credentials: the log keeps it.
        log.warning("reading a run's artifacts from MLflow failed: %s", exc)
        return Unavailable(
            f"MLflow failed ({type(exc).__name__}); check that the tracking server is "
            "running and reachable, then retry"
        )

    def _find_run(self, job: Job) -> Any:
        client = self.client()
        if job.mlflow_run_id:
            return client.get_run(job.mlflow_run_id)
        experiments = [e.experiment_id for e in client.search_experiments()]
        if not experiments:
            return None
        runs = client.search_runs(experiments, filter_string=f"tags.{JOB_TAG} = '{job.id}'")
        return runs[0] if runs else None

    def _sync_metrics(
        self, session: Session, job: Job, history: dict[str, Any], *, final: bool
    ) -> None:
        """One event per step, written once, so only complete steps are written. The job
        logs a step's metrics together and steps in order, while each metric's history is
        read here one after another: every step below the last one ``loss`` has was
        complete before the reading started; the newest step waits for the next pass, or
        for the job to end."""
        horizon = max((int(p.step) for p in history[STEP_METRICS[0]]), default=-1)
        by_step: dict[int, dict[str, float]] = {}
        for key, points in history.items():
            for point in sorted(points, key=lambda p: p.timestamp):  # a resumed job re-logs
                if final or int(point.step) < horizon:
                    by_step.setdefault(int(point.step), {})[key] = float(point.value)
        recorded = set(
            session.scalars(
                select(JobEvent.dedupe_key).where(
                    JobEvent.job_id == job.id, JobEvent.type == "metrics"
                )
            )
        )
        for step in sorted(s for s in by_step if f"metrics:{s}" not in recorded):
            values = by_step[step]
            shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            add_event(
                session, job.id, f"Step {step}: {shown}", type="metrics",
                data={"step": step, **values}, dedupe_key=f"metrics:{step}",
            )  # fmt: skip

    def _sync_checkpoints(self, session: Session, job: Job, checkpoints: list[Any]) -> None:
        known = set(session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job.id)))
        for info in checkpoints:
            if info.step in known:
                continue
            session.add(
                Checkpoint(
                    id=new_id("ftckpt"), job_id=job.id, step=info.step,
                    path=info.path, metrics=info.metrics,
                )
            )  # fmt: skip
            add_event(
                session, job.id, f"Checkpoint saved at step {info.step}",
                data={"step": info.step, "path": info.path}, dedupe_key=f"checkpoint:{info.step}",
            )  # fmt: skip

    def _sync_result(
        self, session: Session, job: Job, run: Any, version: ModelVersionDetail | None
    ) -> None:
        if version is not None:
            job.fine_tuned_model = f"{version.name}/{version.version}"
            mirror_detail(session, version, job)
            add_event(
                session, job.id, f"Registered model version {job.fine_tuned_model}",
                data={"model": version.name, "version": version.version},
                dedupe_key="registered",
            )  # fmt: skip
        tokens = run.data.metrics.get(TRAINED_TOKENS)
        if tokens is not None:
            job.trained_tokens = int(tokens)


def estimate_finish(history: dict[str, Any], recent: int = 20) -> datetime | None:
    """When the run should end: the median time between its last ``recent`` logged steps
    (a median, so the gap of a pause or a restart does not count) times the steps left."""
    points = sorted(history.get(STEP_METRICS[0], []), key=lambda p: int(p.step))[-recent:]
    totals = history.get("total_steps", [])
    if len(points) < 2 or not totals:
        return None
    gaps = sorted(
        (b.timestamp - a.timestamp) / max(1, int(b.step) - int(a.step))
        for a, b in itertools.pairwise(points)
    )
    per_step_ms = gaps[len(gaps) // 2]
    left = max(0, int(max(p.value for p in totals)) - int(points[-1].step))
    return datetime.fromtimestamp((points[-1].timestamp + per_step_ms * left) / 1000, UTC)


# The result file's columns: OpenAI's first (its result CSV), then ours.
RESULT_COLUMNS = {
    "step": "step",
    "train_loss": "loss",
    "train_accuracy": "token_accuracy",
    "valid_loss": "val_loss",
    "valid_mean_token_accuracy": "val_token_accuracy",
    "lr": "lr",
    "grad_norm": "grad_norm",
    "tokens_per_s": "tokens_per_s",
    "epoch": "epoch",
}


def write_result_file(session: Session, job: Job, files_dir: Path) -> File:
    """The job's per-step metrics (its metrics events) as a CSV file of its project."""
    rows = session.scalars(
        select(JobEvent.data)
        .where(JobEvent.job_id == job.id, JobEvent.type == "metrics")
        .order_by(JobEvent.seq)
    ).all()
    by_step = {int(d["step"]): d for d in rows if d}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for step in sorted(by_step):
        data = by_step[step]
        writer.writerow(["" if data.get(k) is None else data[k] for k in RESULT_COLUMNS.values()])
    content = out.getvalue().encode()
    file_id = new_id("file")
    folder = files_dir / job.project_id
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{file_id}.csv"
    path.write_bytes(content)
    row = File(
        id=file_id, project_id=job.project_id, filename=f"{job.id}-step_metrics.csv",
        purpose=RESULTS_PURPOSE, bytes=len(content), sha256=hashlib.sha256(content).hexdigest(),
        path=str(path), format="csv", num_records=len(by_step),
    )  # fmt: skip
    session.add(row)
    session.flush()
    return row


def _job(session: Session, job_id: str | None) -> Job | None:
    return None if job_id is None else session.scalar(select(Job).where(Job.id == job_id))


def _sync_lora_stats(session: Session, job: Job, metrics: dict[str, float]) -> None:
    """A LoRA job's one event with what it trains: adapter parameters of all parameters."""
    stats = {
        k.removeprefix(LORA_METRIC_PREFIX): v
        for k, v in metrics.items()
        if k.startswith(LORA_METRIC_PREFIX)
    }
    if "trainable_fraction" not in stats:
        return
    message = (
        f"LoRA: {int(stats.get('trainable_params', 0))} of {int(stats.get('total_params', 0))} "
        f"parameters trainable ({100 * stats['trainable_fraction']:.3g}%)"
    )
    add_event(session, job.id, message, data=stats, dedupe_key="lora")


def _sync_data_stats(session: Session, job: Job, metrics: dict[str, float]) -> None:
    """One event with what tokenization did to the dataset: examples longer than the
    block size are said out loud (s1: truncating its traces cost 20 AIME points)."""
    stats = {
        k.removeprefix(DATA_METRIC_PREFIX): int(v)
        for k, v in metrics.items()
        if k.startswith(DATA_METRIC_PREFIX)
    }
    if "records" not in stats:
        return
    block = job.config.get("block_size")
    message = (
        f"Dataset: {stats.get('kept', 0)} of {stats['records']} examples kept, "
        f"{stats.get('sequences', 0)} training sequences, {stats.get('trained_tokens', 0)} "
        "trained tokens"
    )
    overlong = stats.get("overlong", 0)
    if overlong:
        message += (
            f"; {overlong} longer than block_size {block} ({stats.get('truncated', 0)} "
            f"truncated, {stats.get('dropped', 0)} dropped)"
        )
    add_event(
        session, job.id, message, level="warning" if overlong else "info",
        data={**stats, "block_size": block}, dedupe_key="data",
    )  # fmt: skip


def mirror_version(
    session: Session, registry: ModelRegistry, name: str, version: int, job: Job | None = None
) -> ModelVersion:
    """Copy one registry version's lineage into the database (insert or refresh). The
    manifest and its ``manifest_sha256`` tag are pinned the first time the version is
    seen and never refreshed from MLflow (``thinkforge.platform.trust`` checks against them)."""
    return mirror_detail(session, registry.get_version(name, version), job)


def mirror_detail(
    session: Session, detail: ModelVersionDetail, job: Job | None = None
) -> ModelVersion:
    """``mirror_version`` of a version already read from the registry."""
    name, version = detail.name, detail.version
    row = session.scalar(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    )
    if row is None:
        row = ModelVersion(name=name, version=version)
        session.add(row)
    lineage = detail.lineage
    row.project_id = job.project_id if job is not None else row.project_id
    row.job_id = lineage.get(JOB_TAG) or (job.id if job is not None else None)
    row.run_id = detail.run_id
    row.base_model = lineage.get(BASE_MODEL_TAG)
    owner = job if job is not None else _job(session, row.job_id)
    if owner is not None and CHECKPOINT_REF.fullmatch(owner.model):
        row.base_model = owner.model  # a warm start: the checkpoint, not its folder
    row.dataset_sha256 = lineage.get(DATASET_SHA_TAG)
    row.recipe = lineage.get(RECIPE_TAG)
    row.metrics = dict(detail.metrics)
    if row.manifest_sha256 is None:
        row.manifest_sha256 = detail.tags.get(MANIFEST_SHA_TAG)
        row.manifest = dict(detail.manifest) if detail.manifest is not None else None
    row.status = detail.status.value
    row.source = detail.source
    return row


class MirrorRefresher:
    """A reconciler task that keeps the lineage mirror in step with MLflow, the registry of
    record: versions registered outside a job (an operator's) and versions whose status
    changed are (re)copied. Jobs mirror their own version as they end; this pass, at most
    every ``every_s`` seconds, catches the rest.

        tasks=[MirrorRefresher(ctx.sessions, ctx.registry)]
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        registry: Callable[[], ModelRegistry],
        *,
        every_s: float = 30.0,
    ) -> None:
        self._sessions = sessions
        self._registry = registry
        self._every = every_s
        self._last = float("-inf")

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self._last < self._every:
            return
        self._last = now
        registry = self._registry()
        columns = select(ModelVersion.name, ModelVersion.version, ModelVersion.status)
        with self._sessions() as session:
            known = {(name, version): status for name, version, status in session.execute(columns)}
        for v in _every_version(registry):
            if known.get((v.name, v.version)) == v.status.value:
                continue
            try:
                with self._sessions.begin() as session:
                    mirror_version(session, registry, v.name, v.version)
            except Exception:  # one unreadable version must not stop the others
                log.exception("mirroring %s/%s failed; retried on a later pass", v.name, v.version)


def _every_version(registry: ModelRegistry) -> Iterator[ModelVersionInfo]:
    for model in all_models(registry):
        yield from all_versions(registry, model.name)
