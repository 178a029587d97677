"""Evaluations: a thinking-budget sweep over a live deployment, run as a Ray Job.

The job (``python -m thinkforge.jobs.evaluate``) asks the deployment every question at
every budget through the Serve front door, writes ``results.json`` and ``plot.png``
(accuracy against average thinking tokens) and logs both to MLflow. The reconciler
copies the per-budget summary into the row; the registry's promotion policy can then
require a passing evaluation of the version being promoted.

    row = create_eval(session, settings, project_id=..., spec=EvalCreate(...))
    reconcile_evals(sessions, launcher, settings)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from thinkforge.jobs.evaluate import EVAL_TAG, PLOT_FILE, RESULTS_FILE, EvalConfig
from thinkforge.platform.deployments import get_deployment
from thinkforge.platform.errors import Conflict, InvalidRequest, NotFound, first_error_location
from thinkforge.platform.files import get_file
from thinkforge.platform.launcher import JobLauncher, LaunchSpec, LaunchState
from thinkforge.platform.models import Evaluation, new_id, utcnow
from thinkforge.platform.ray_launcher import job_error_line
from thinkforge.platform.schemas import EvalCreate
from thinkforge.platform.settings import Settings

log = logging.getLogger(__name__)
TERMINAL = ("succeeded", "failed", "cancelled")
# queued -> running -> succeeded | failed; cancelling -> cancelled once Ray has stopped it


def create_eval(
    session: Session,
    settings: Settings,
    *,
    project_id: str,
    spec: EvalCreate,
    version: tuple[str, int] | None = None,
) -> Evaluation:
    """An evaluation of a deployment (asked through the front door) or of a registry
    version (``spec.model``, resolved by the caller to ``version`` through its view of the
    registry; the job loads it in-process)."""
    target = _target(session, settings, project_id, spec, version)
    if spec.dataset.startswith("file-"):
        try:
            dataset = get_file(session, project_id=project_id, file_id=spec.dataset).path
        except NotFound:
            raise InvalidRequest(
                f"no file {spec.dataset!r} in this project", param="dataset"
            ) from None
    else:
        path = Path(spec.dataset).resolve()
        if (
            not any(path.is_relative_to(r.resolve()) for r in settings.dataset_roots)
            or not path.is_file()
        ):
            raise InvalidRequest(
                "dataset must be a file id or a file under a dataset root", param="dataset"
            )
        dataset = str(path)
    eval_id = new_id("eval")
    try:
        config = EvalConfig.model_validate(
            {
                "dataset": dataset,
                **target.config,
                "budgets": [b.model_dump(exclude_none=True) for b in spec.budgets],
                "max_completion_tokens": spec.max_completion_tokens,
                "concurrency": spec.concurrency,
                "limit": spec.limit,
                "seed": spec.seed,
            }
        )
    except ValidationError as exc:
        loc, msg = first_error_location(exc)
        raise InvalidRequest(f"{loc}: {msg}") from None
    row = Evaluation(
        id=eval_id, project_id=project_id, status="queued", deployment=target.deployment,
        model_version=target.version, config=config.model_dump(mode="json"),
        output_dir=str(settings.data_dir / "evals" / eval_id),
    )  # fmt: skip
    session.add(row)
    session.flush()
    return row


@dataclass(frozen=True)
class _Target:
    deployment: str | None
    version: str | None  # name/version
    config: dict[str, Any]  # EvalConfig's fields saying whom to ask


def _target(
    session: Session,
    settings: Settings,
    project_id: str,
    spec: EvalCreate,
    version: tuple[str, int] | None,
) -> _Target:
    if spec.deployment is not None:
        deployment = get_deployment(session, project_id=project_id, name=spec.deployment)
        config = {"base_url": settings.serve_url, "model": deployment.name}
        return _Target(deployment.name, deployment.served_version, config)
    if version is None:
        raise InvalidRequest("give a deployment or a registry version", param="model")
    name, number = version
    # No tracking_uri: the job reads MLFLOW_TRACKING_URI, which the launcher sets.
    config = {"model_uri": f"models:/{name}/{number}", "model": name}
    return _Target(None, f"{name}/{number}", config)


def get_eval(session: Session, *, project_id: str, eval_id: str, lock: bool = False) -> Evaluation:
    stmt = select(Evaluation).where(Evaluation.id == eval_id, Evaluation.project_id == project_id)
    row = session.scalar(stmt.with_for_update() if lock else stmt)
    if row is None:
        raise NotFound(f"no evaluation {eval_id!r} in this project", param="eval_id")
    return row


def cancel_eval(session: Session, *, project_id: str, eval_id: str) -> tuple[Evaluation, bool]:
    """Cancel an evaluation; returns it and whether its launched run must be stopped."""
    row = get_eval(session, project_id=project_id, eval_id=eval_id, lock=True)
    if row.status in TERMINAL:
        raise Conflict(f"evaluation {eval_id} already ended ({row.status}); nothing to cancel")
    if row.submitted_at is None:
        row.status, row.finished_at = "cancelled", utcnow()
        return row, False
    row.status = "cancelling"
    return row, True


def plot_path(row: Evaluation) -> Path:
    path = Path(row.output_dir) / PLOT_FILE
    if row.status != "succeeded" or not path.is_file():
        raise Conflict(f"evaluation {row.id} is {row.status}; its plot exists once it succeeds")
    return path


def launch_spec(row: Evaluation, settings: Settings) -> LaunchSpec:
    args = [
        "--eval-id", row.id, "--config-json", json.dumps(row.config, separators=(",", ":")),
        "--output", row.output_dir,
    ]  # fmt: skip
    if settings.mlflow_artifact_root:
        args += ["--mlflow-artifact-root", settings.mlflow_artifact_root]
    return LaunchSpec(job_id=row.id, config={}, module="thinkforge.jobs.evaluate", args=tuple(args))


def reconcile_evals(
    sessions: sessionmaker[Session], launcher: JobLauncher, settings: Settings
) -> None:
    with sessions() as session:
        pending = list(
            session.scalars(select(Evaluation).where(Evaluation.status.not_in(TERMINAL)))
        )
    for row in pending:
        try:
            _advance(sessions, launcher, settings, row)
        except Exception:  # one evaluation must not stop the others
            log.exception("reconciling evaluation %s failed", row.id)


def _advance(
    sessions: sessionmaker[Session], launcher: JobLauncher, settings: Settings, row: Evaluation
) -> None:
    if row.submitted_at is None:
        _submit(sessions, launcher, settings, row)
        return
    status = launcher.status(row.id)
    if row.status == "cancelling" and status.state in (LaunchState.PENDING, LaunchState.RUNNING):
        launcher.cancel(row.id)
        return
    run_id, fetched = None, False
    if status.state is LaunchState.SUCCEEDED:  # MLflow is asked before the row is locked
        run_id = _eval_run(settings.mlflow_tracking_uri, row.id)
        fetched = _fetch_from_mlflow(row, settings.mlflow_tracking_uri, run_id)
    with sessions.begin() as session:
        current = session.scalar(
            select(Evaluation).where(Evaluation.seq == row.seq).with_for_update()
        )
        if current is None or current.status in TERMINAL:
            return
        if current.status == "cancelling" and status.state is not LaunchState.SUCCEEDED:
            current.status, current.finished_at = "cancelled", utcnow()
        elif status.state is LaunchState.RUNNING:
            current.status = "running"
        elif status.state is LaunchState.SUCCEEDED:
            _finish(current)
            if current.mlflow_run_id is None and (fetched or current.status == "succeeded"):
                current.mlflow_run_id = run_id
        elif status.state in (LaunchState.FAILED, LaunchState.UNKNOWN, LaunchState.STOPPED):
            message = (
                job_error_line(status.log_tail) or status.message or "the evaluation run ended"
            )
            current.status = "cancelled" if status.state is LaunchState.STOPPED else "failed"
            current.error = {"code": "eval_failed", "message": message}
            current.finished_at = utcnow()


def _submit(
    sessions: sessionmaker[Session], launcher: JobLauncher, settings: Settings, row: Evaluation
) -> None:
    """Launch, as jobs do: a launcher error ends the evaluation with the reason kept.
    A second submission of one id is a no-op in the launcher, so a crash between the
    submit and the row's update is safe."""
    failure: dict[str, str] | None = None
    try:
        launcher.submit(launch_spec(row, settings))
    except Exception as exc:
        log.exception("evaluation %s: launch failed", row.id)
        failure = {"code": "launch_failed", "message": f"could not start the run: {exc}"}
    with sessions.begin() as session:
        current = session.scalar(
            select(Evaluation).where(Evaluation.seq == row.seq).with_for_update()
        )
        if current is None:
            return
        cancelled = current.status in ("cancelling", "cancelled")
        if failure is not None and not cancelled:
            current.status, current.error, current.finished_at = "failed", failure, utcnow()
        elif failure is None:
            current.submitted_at = utcnow()
    if cancelled and failure is None:
        launcher.cancel(row.id)  # cancelled while the submission was on its way


def _fetch_from_mlflow(row: Evaluation, tracking_uri: str, run_id: str | None) -> bool:
    """When the run wrote its results on another node's disk (a cluster without shared
    storage), take them from the evaluation's MLflow run instead; True if it did."""
    out = Path(row.output_dir)
    if (out / RESULTS_FILE).is_file() or run_id is None:
        return False
    import mlflow.artifacts

    out.mkdir(parents=True, exist_ok=True)
    for name in (RESULTS_FILE, PLOT_FILE):
        try:
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=name, dst_path=str(out), tracking_uri=tracking_uri
            )
        except Exception as exc:  # a missing plot still leaves the results usable
            log.warning("evaluation %s: %s not in MLflow run %s: %s", row.id, name, run_id, exc)
    return True


def _finish(row: Evaluation) -> None:
    results = Path(row.output_dir) / RESULTS_FILE
    try:
        data: dict[str, Any] = json.loads(results.read_text())
    except (OSError, ValueError) as exc:
        row.status, row.error = "failed", {"code": "eval_failed", "message": f"no results: {exc}"}
    else:
        row.summary = data.get("budgets", [])
        row.best_accuracy = max((b["accuracy"] for b in row.summary or []), default=0.0)
        row.mlflow_run_id = data.get("mlflow_run_id") or row.mlflow_run_id
        row.status = "succeeded"
        _record_answering_version(row, data.get("model_versions") or [])
    row.finished_at = utcnow()


def _record_answering_version(row: Evaluation, seen: list[int]) -> None:
    """The version an evaluation vouches for is the one that answered, not the one the
    deployment served when it was created: an alias moved mid-sweep rolls the deployment.
    Answers from several versions vouch for none of them (and the row says why)."""
    name = (row.model_version or "").partition("/")[0]
    if not seen or not name:
        return  # the answers named no registry version: keep what was served at creation
    if len(seen) == 1:
        row.model_version = f"{name}/{seen[0]}"
        return
    row.model_version = None
    listed = ", ".join(str(v) for v in seen)
    row.error = {
        "code": "mixed_versions",
        "message": f"answers came from versions {listed} of {name} (the deployment rolled "
        "during the sweep): this evaluation counts for no version when promoting",
    }


def _eval_run(tracking_uri: str, eval_id: str) -> str | None:
    """The MLflow run the evaluation job logged (tagged with its id), if any."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.{EVAL_TAG} = '{eval_id}'")
    return str(runs[0].info.run_id) if runs else None


def passing_eval(session: Session, model_version: str, min_accuracy: float) -> Evaluation | None:
    """The best succeeded evaluation of ``name/version`` at or above ``min_accuracy``."""
    return session.scalar(
        select(Evaluation)
        .where(
            Evaluation.model_version == model_version,
            Evaluation.status == "succeeded",
            Evaluation.best_accuracy >= min_accuracy,
        )
        .order_by(Evaluation.best_accuracy.desc())
        .limit(1)
    )
