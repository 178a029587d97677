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

from thinkforge.contract import EVAL_TAG, PLOT_FILE, RESULTS_FILE
from thinkforge.jobs.evaluate import EvalConfig
from thinkforge.platform.auth import create_derived_key, derived_key
from thinkforge.platform.deployments import get_deployment
from thinkforge.platform.errors import Conflict, InvalidRequest, NotFound, first_error_location
from thinkforge.platform.files import resolve_dataset
from thinkforge.platform.launcher import JobLauncher, LaunchState, ModuleLaunch
from thinkforge.platform.models import Evaluation, new_id
from thinkforge.platform.pagination import page
from thinkforge.platform.ray_launcher import job_error_line
from thinkforge.platform.runs import cancel_target, move_run, reconcile_rows, submit_row
from thinkforge.platform.schemas import EvalCreate
from thinkforge.platform.settings import Settings
from thinkforge.platform.status import EvalFailureKind, EvalStatus

log = logging.getLogger(__name__)
TERMINAL = tuple(s.value for s in EvalStatus if s.is_terminal())
MIXED_VERSIONS = "mixed_versions"  # the error.code of a succeeded sweep that vouches for none


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
    dataset = resolve_dataset(
        session, settings, project_id=project_id, ref=spec.dataset, param="dataset"
    ).path
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
        id=eval_id, project_id=project_id, status=EvalStatus.QUEUED.value,
        deployment=target.deployment, model_version=target.version, config=config.model_dump(mode="json"),
        output_dir=str(settings.data_dir / "evals" / eval_id),
    )  # fmt: skip
    session.add(row)
    if target.deployment is not None:  # the run asks the front door with a key of its own
        create_derived_key(
            session, settings.secret_key.get_secret_value(), project_id=project_id,
            key_id=_eval_key_id(eval_id), purpose=eval_id, role="inference",
        )  # fmt: skip
    session.flush()
    return row


def _eval_key_id(eval_id: str) -> str:
    return "key-" + eval_id.removeprefix("eval-")


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


def list_evals(
    session: Session, *, project_id: str, after: str | None, limit: int
) -> tuple[list[Evaluation], bool]:
    stmt = select(Evaluation).where(Evaluation.project_id == project_id)
    return page(session, stmt, Evaluation, after=after, limit=limit)


def cancel_eval(session: Session, *, project_id: str, eval_id: str) -> tuple[Evaluation, bool]:
    """Cancel an evaluation; returns it and whether its launched run must be stopped."""
    row = get_eval(session, project_id=project_id, eval_id=eval_id, lock=True)
    target = cancel_target(
        EvalStatus(row.status), launched=row.submitted_at is not None, what=f"evaluation {eval_id}"
    )
    if target is not None:
        set_status(row, target)
    return row, target is not EvalStatus.CANCELLED


def set_status(row: Evaluation, target: EvalStatus, *, error: dict[str, Any] | None = None) -> bool:
    return move_run(row, target, what="evaluation", error=error)


def plot_path(row: Evaluation) -> Path:
    path = Path(row.output_dir) / PLOT_FILE
    if row.status != EvalStatus.SUCCEEDED or not path.is_file():
        raise Conflict(f"evaluation {row.id} is {row.status}; its plot exists once it succeeds")
    return path


def launch_spec(row: Evaluation, settings: Settings) -> ModuleLaunch:
    args = [
        "--eval-id", row.id, "--config-json", json.dumps(row.config, separators=(",", ":")),
        "--output", row.output_dir,
    ]  # fmt: skip
    if settings.mlflow_artifact_root:
        args += ["--mlflow-artifact-root", settings.mlflow_artifact_root]
    env = {}
    if row.deployment is not None:
        env["THINKFORGE_API_KEY"] = derived_key(settings.secret_key.get_secret_value(), row.id)
    return ModuleLaunch(job_id=row.id, module="thinkforge.jobs.evaluate", args=tuple(args), env=env)


def reconcile_evals(
    sessions: sessionmaker[Session], launcher: JobLauncher, settings: Settings
) -> None:
    reconcile_rows(
        sessions, Evaluation, terminal=TERMINAL, run_key_id=_eval_key_id,
        advance=lambda row: _advance(sessions, launcher, settings, row),
    )  # fmt: skip


def _advance(
    sessions: sessionmaker[Session], launcher: JobLauncher, settings: Settings, row: Evaluation
) -> None:
    if row.submitted_at is None:
        _submit(sessions, launcher, settings, row)
        return
    status = launcher.status(row.id)
    live = status.state in (LaunchState.PENDING, LaunchState.RUNNING)
    if row.status == EvalStatus.CANCELLING and live:
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
        if current.status == EvalStatus.CANCELLING and status.state is not LaunchState.SUCCEEDED:
            set_status(current, EvalStatus.CANCELLED)
        elif status.state is LaunchState.RUNNING:
            set_status(current, EvalStatus.RUNNING)
        elif status.state is LaunchState.SUCCEEDED:
            _finish(current)
            succeeded = current.status == EvalStatus.SUCCEEDED
            if current.mlflow_run_id is None and (fetched or succeeded):
                current.mlflow_run_id = run_id
        elif status.state in (LaunchState.FAILED, LaunchState.UNKNOWN, LaunchState.STOPPED):
            message = (
                job_error_line(status.log_tail) or status.message or "the evaluation run ended"
            )
            stopped = status.state is LaunchState.STOPPED
            error = {"code": EvalFailureKind.EVAL_FAILED.value, "message": message}
            set_status(current, EvalStatus.CANCELLED if stopped else EvalStatus.FAILED, error=error)


def _submit(
    sessions: sessionmaker[Session], launcher: JobLauncher, settings: Settings, row: Evaluation
) -> None:
    def fail(current: Evaluation, message: str) -> None:
        error = {"code": EvalFailureKind.LAUNCH_FAILED.value, "message": message}
        set_status(current, EvalStatus.FAILED, error=error)

    submit_row(
        sessions, launcher, Evaluation, row.seq,
        build_spec=lambda: launch_spec(row, settings), fail=fail,
    )  # fmt: skip


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
        error = {"code": EvalFailureKind.EVAL_FAILED.value, "message": f"no results: {exc}"}
        set_status(row, EvalStatus.FAILED, error=error)
    else:
        row.summary = data.get("budgets", [])
        row.best_accuracy = max((b["accuracy"] for b in row.summary or []), default=0.0)
        row.mlflow_run_id = data.get("mlflow_run_id") or row.mlflow_run_id
        set_status(row, EvalStatus.SUCCEEDED)
        _record_answering_version(row, data.get("model_versions") or [])


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
        "code": MIXED_VERSIONS,
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
            Evaluation.status == EvalStatus.SUCCEEDED.value,
            Evaluation.best_accuracy >= min_accuracy,
        )
        .order_by(Evaluation.best_accuracy.desc())
        .limit(1)
    )
