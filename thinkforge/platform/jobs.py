"""Fine-tune jobs: creation, listing, cancellation, pause and resume, and every status
change, in one place.

Routes call these keyword-only functions inside a transaction; launching happens after
the commit (``advance_job``), from the request's background task or the reconciler,
whichever comes first: both claim the job with a conditional update. Creating a job
also claims, for its project, the registered model name it will register under
(``ownership.claim``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from thinkforge.contract import EXPERTS_PLOT, TINY_MODEL, TINY_MOE_MODEL, default_registered_name
from thinkforge.jobs.checkpoints import clear_pause, request_pause
from thinkforge.jobs.config import MOE_MODEL_TYPES, SFTConfig, moe_kind, unknown_targets
from thinkforge.platform import ownership
from thinkforge.platform.errors import (
    Conflict,
    InvalidFile,
    InvalidRequest,
    NotFound,
    first_error_location,
)
from thinkforge.platform.files import DatasetInfo, resolve_dataset, validate_dataset
from thinkforge.platform.launcher import JobLauncher, TrainingLaunch
from thinkforge.platform.models import Checkpoint, Job, JobEvent, new_id, utcnow
from thinkforge.platform.pagination import page
from thinkforge.platform.paths import CHECKPOINT_REF, CONFIG_PATHS, resolve_model
from thinkforge.platform.recipes import load_recipe
from thinkforge.platform.registry import ModelRegistry
from thinkforge.platform.runs import cancel_target, is_cancelled, launch_run
from thinkforge.platform.schemas import JobCreate
from thinkforge.platform.settings import Settings
from thinkforge.platform.status import FailureKind, JobStatus, moves


def create_job(
    session: Session,
    settings: Settings,
    *,
    project_id: str,
    spec: JobCreate,
    registry: ModelRegistry | None = None,
) -> Job:
    """Validate and write a job (not yet launched). With a ``registry``, a name that
    exists there unclaimed (an operator's shared model) cannot be claimed."""
    dataset = resolve_dataset(
        session, settings, project_id=project_id, ref=spec.training_file,
        param="training_file", folders=True,
    )  # fmt: skip
    validation = _validation_dataset(session, settings, project_id, spec)
    model = resolve_model(session, settings, project_id=project_id, model=spec.model)
    config, choices = _resolve_config(settings, spec, dataset.path, model)
    if validation is not None:
        config = config.model_copy(update={"validation_dataset": validation})
    if config.format.value not in ("auto", dataset.format):
        raise InvalidRequest(
            f"config.format is {config.format.value!r} but the training file is {dataset.format!r}",
            param="config.format",
        )
    registered = config.registered_model_name or _default_name(session, spec.model)
    ownership.claim(session, project_id=project_id, name=registered, registry=registry)
    job = Job(
        id=new_id("ftjob"),
        project_id=project_id,
        status=JobStatus.VALIDATING_FILES.value,
        model=spec.model,
        training_file=spec.training_file,
        validation_file=spec.validation_file,
        dataset_path=dataset.path,
        dataset_sha256=dataset.sha256,
        suffix=spec.suffix,
        seed=config.seed,
        user_metadata=spec.metadata,
        recipe=spec.recipe,
        config=config.model_dump(mode="json"),
        max_retries=settings.job_max_retries if spec.max_retries is None else spec.max_retries,
        hyperparameter_choices=choices or None,
    )
    session.add(job)
    session.flush()
    add_event(session, job.id, "Validating training file", dedupe_key="created")
    if CHECKPOINT_REF.fullmatch(spec.model):
        add_event(
            session, job.id, f"Warm start from checkpoint {spec.model}",
            data={"checkpoint": spec.model, "path": config.model}, dedupe_key="warm_start",
        )  # fmt: skip
    return job


def _default_name(session: Session, model: str) -> str:
    """The registry name a job registers under unless told: a warm start goes on as a new
    version of the model its checkpoint's job registers (followed up a chain of them)."""
    for _ in range(32):
        warm = CHECKPOINT_REF.fullmatch(model)
        if warm is None:
            break
        parent = session.scalar(select(Job).where(Job.id == warm[1]))
        if parent is None:
            break
        if parent.config.get("registered_model_name"):
            return str(parent.config["registered_model_name"])
        model = parent.model
    return default_registered_name(model)


def _validation_dataset(
    session: Session, settings: Settings, project_id: str, spec: JobCreate
) -> str | None:
    """The held-out set's path: ``validation_file``, or ``config.validation_dataset``
    (resolved by the same rules), never both."""
    given = (spec.config or {}).get("validation_dataset")
    if given is not None and spec.validation_file is not None:
        raise InvalidRequest(
            "give the validation set as validation_file or config.validation_dataset, not both",
            param="config.validation_dataset",
        )
    if given is not None and not isinstance(given, str):
        raise InvalidRequest(
            "config.validation_dataset must be a file id or a path",
            param="config.validation_dataset",
        )
    ref, param = (
        (given, "config.validation_dataset") if given is not None
        else (spec.validation_file, "validation_file")
    )  # fmt: skip
    if ref is None:
        return None
    return resolve_dataset(
        session, settings, project_id=project_id, ref=ref, param=param, folders=True
    ).path


def _resolve_config(
    settings: Settings, spec: JobCreate, dataset_path: str, model: str
) -> tuple[SFTConfig, dict[str, Any]]:
    """The job's config, and its "auto" and multiplier choices (``resolve_auto``)."""
    if spec.method is not None and spec.hyperparameters is not None:
        raise InvalidRequest(
            "give hyperparameters in method.supervised.hyperparameters or at the top level, "
            "not both",
            param="hyperparameters",
        )
    for key, field in CONFIG_PATHS.items():
        if field is not None and key in (spec.config or {}):
            raise InvalidRequest(f"config.{key}: give it as {field}", param=f"config.{key}")
    data: dict[str, Any] = load_recipe(settings, spec.recipe) if spec.recipe else {}
    data.update(spec.config or {})
    data["model"] = model
    data["dataset"] = dataset_path
    data.pop("validation_dataset", None)  # resolved apart, by the same rules
    if spec.recipe is not None:
        data["recipe"] = spec.recipe
    hyper = spec.hyperparameters or (
        spec.method.supervised.hyperparameters if spec.method else None
    )
    choices: dict[str, Any] = {}
    if hyper is not None:
        given = hyper.model_dump(exclude_unset=True)
        choices = {k: given.pop(k) for k in AUTO_FIELDS if given.get(k) == "auto"}
        multiplier = given.pop("learning_rate_multiplier", None)
        if multiplier is not None and "learning_rate" in given:
            raise InvalidRequest(
                "give learning_rate or learning_rate_multiplier, not both",
                param=_param_for("hyperparameters.learning_rate_multiplier", spec),
            )
        if multiplier is not None:
            choices["learning_rate_multiplier"] = multiplier
        data["hyperparameters"] = {**data.get("hyperparameters", {}), **given}
    lora = spec.method.supervised.lora if spec.method else None
    if lora is not None:
        data["lora"] = lora.model_dump()
    if spec.resources is not None:
        data["resources"] = spec.resources.model_dump()
    if spec.seed is not None:
        data["seed"] = spec.seed
    if spec.suffix is not None:
        data["registered_model_name"] = spec.suffix
    try:
        config = SFTConfig.model_validate(data)
    except ValidationError as exc:
        loc, msg = first_error_location(exc)
        raise InvalidRequest(f"{loc}: {msg}", param=_param_for(loc, spec)) from None
    _check_experts(config)
    _check_lora_targets(config)
    return config, choices


AUTO_FIELDS = ("n_epochs", "batch_size", "learning_rate_multiplier")
# "auto" epochs: enough to see ~100 examples, no more than ~25,000 (OpenAI's bounds).
_MIN_EXAMPLES_SEEN, _MAX_EXAMPLES_SEEN = 100, 25_000


def resolve_auto(config: dict[str, Any], choices: dict[str, Any], n_records: int) -> dict[str, Any]:
    """The config's hyperparameters with the request's autos resolved for a dataset of
    ``n_records``; ``config`` holds the recipe's (or the defaults') values for them.

    - n_epochs: the recipe's, raised so the run sees at least ~100 examples and lowered
      so it sees at most ~25,000 (never below 1);
    - batch_size: the recipe's, lowered (in multiples of micro batch x workers) so an
      epoch has at least 4 steps;
    - learning_rate_multiplier: a factor on the recipe's learning rate; auto is 1, or
      sqrt(batch / recipe batch) when auto lowered the batch (square-root scaling)."""
    hyper = dict(config.get("hyperparameters", {}))
    n = max(1, n_records)
    if choices.get("n_epochs") == "auto":
        epochs = max(int(hyper.get("n_epochs", 5)), math.ceil(_MIN_EXAMPLES_SEEN / n))
        hyper["n_epochs"] = max(1, min(epochs, _MAX_EXAMPLES_SEEN // n, 1000))
    recipe_batch = int(hyper.get("batch_size", 16))
    if choices.get("batch_size") == "auto":
        res = config.get("resources", {})
        per_step = int(hyper.get("micro_batch_size", 1)) * int(res.get("num_workers", 1))
        cap = max(per_step, (n // 4) // per_step * per_step)
        hyper["batch_size"] = min(recipe_batch, cap)
    multiplier = choices.get("learning_rate_multiplier")
    if multiplier == "auto":
        multiplier = math.sqrt(hyper["batch_size"] / recipe_batch)
    if multiplier is not None:
        hyper["learning_rate"] = float(hyper.get("learning_rate", 1e-5)) * float(multiplier)
        hyper["learning_rate_multiplier"] = float(multiplier)
    return hyper


def _check_experts(config: SFTConfig) -> None:
    """A local base model's config.json against the job's ``moe`` section (a hub id or a
    registry version is checked by the job when it loads the model)."""
    path = Path(config.model) / "config.json"
    if not path.is_absolute() or not path.is_file():
        return
    try:
        kind = moe_kind(json.loads(path.read_text()))
    except (OSError, ValueError, AttributeError):
        return  # the job reports an unreadable model with its own message
    if kind == "unknown":
        raise InvalidRequest(
            f"model {config.model!r} is a mixture of experts whose router thinkforge does not "
            f"know (supported: {', '.join(MOE_MODEL_TYPES)})",
            param="model",
            code="invalid_model",
        )
    if kind == "dense" and config.moe is not None:
        raise InvalidRequest(
            f"config.moe: the base model {config.model!r} is dense (no experts); remove the "
            "moe section",
            param="config.moe",
        )


def _check_lora_targets(config: SFTConfig) -> None:
    """LoRA target modules against the base's architecture, where the control plane can
    tell it (the tiny models, a local model's config.json); otherwise the job checks them
    against the model itself and fails with code invalid_model."""
    if config.lora is None:
        return
    arch = _TINY_ARCHITECTURES.get(config.model)
    path = Path(config.model) / "config.json"
    if arch is None and path.is_absolute() and path.is_file():
        try:
            arch = json.loads(path.read_text())
        except (OSError, ValueError):
            return  # the job reports an unreadable model with its own message
    unknown = unknown_targets(config.lora.target_modules, arch) if isinstance(arch, dict) else None
    if unknown:
        raise InvalidRequest(
            f"method.supervised.lora.target_modules: the base model {config.model!r} has no "
            f"module named {', '.join(repr(u) for u in unknown)}",
            param="method.supervised.lora.target_modules",
        )


_TINY_ARCHITECTURES = {
    TINY_MODEL: {"model_type": "qwen2"},
    TINY_MOE_MODEL: {"model_type": "qwen3_moe"},
}


def _param_for(loc: str, spec: JobCreate) -> str:
    if loc.startswith(("hyperparameters", "lora")) and spec.method is not None:
        return f"method.supervised.{loc}"
    if loc.startswith(("hyperparameters", "resources", "model", "seed")):
        return loc
    return f"config.{loc}"


def get_job(session: Session, *, project_id: str, job_id: str, lock: bool = False) -> Job:
    stmt = select(Job).where(Job.id == job_id, Job.project_id == project_id)
    if lock:
        stmt = stmt.with_for_update()
    job = session.scalar(stmt)
    if job is None:
        raise NotFound(f"no fine-tuning job {job_id!r} in this project", param="fine_tuning_job_id")
    return job


def list_jobs(
    session: Session,
    *,
    project_id: str,
    after: str | None,
    limit: int,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Job], bool]:
    stmt = select(Job).where(Job.project_id == project_id)
    for key, value in (metadata or {}).items():
        stmt = stmt.where(Job.user_metadata[key].as_string() == value)
    return page(session, stmt, Job, after=after, limit=limit)


def list_job_rows(
    session: Session,
    model: type[JobEvent] | type[Checkpoint],
    *,
    project_id: str,
    job_id: str,
    after: str | None,
    limit: int,
) -> tuple[list[Any], bool]:
    """A page of one job's events or checkpoints, newest first; 404 for another's job."""
    get_job(session, project_id=project_id, job_id=job_id)
    stmt = select(model).where(model.job_id == job_id)
    return page(session, stmt, model, after=after, limit=limit)


class RunArtifacts(Protocol):
    def run_artifact(self, run_id: str, path: str) -> bytes | None: ...


def expert_heatmap(
    sessions: sessionmaker[Session],
    artifacts: RunArtifacts | None,
    *,
    project_id: str,
    job_id: str,
) -> bytes:
    """The PNG of expert load by layer and expert that an MoE job's run logged at its
    latest checkpoint; NotFound for another project's job, a dense model's, or before
    the first checkpoint. MLflow is read with no session open."""
    with sessions() as session:
        run_id = get_job(session, project_id=project_id, job_id=job_id).mlflow_run_id
    png = artifacts.run_artifact(run_id, EXPERTS_PLOT) if artifacts and run_id else None
    if png is None:
        raise NotFound(
            f"fine-tuning job {job_id!r} has no expert-load heatmap: a mixture-of-experts "
            "job logs one at each checkpoint (a dense model never does); retry after its "
            "first checkpoint",
            param="fine_tuning_job_id",
            code="expert_heatmap_not_found",
        )
    return png


def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
    dedupe_key: str | None = None,
) -> None:
    if dedupe_key is not None:
        exists = session.scalar(
            select(JobEvent.seq).where(JobEvent.job_id == job_id, JobEvent.dedupe_key == dedupe_key)
        )
        if exists is not None:
            return
    session.add(
        JobEvent(
            id=new_id("ftevent"),
            job_id=job_id,
            level=level,
            type=type,
            message=message,
            data=data,
            dedupe_key=dedupe_key,
        )
    )


def set_status(
    session: Session,
    job: Job,
    target: JobStatus,
    *,
    message: str,
    error: dict[str, Any] | None = None,
) -> bool:
    """Move ``job`` to ``target`` if the status machine allows it; returns whether it moved."""
    if not moves(JobStatus(job.status), target, what=f"job {job.id}"):
        return False
    now = utcnow()
    if job.status == JobStatus.PAUSED.value and target is JobStatus.QUEUED:
        job.resumes += 1  # a resume: submitted again, under a new submission id
        job.submitted_at = None
    job.status = target.value
    if target is JobStatus.RUNNING and job.started_at is None:
        job.started_at = now
    if target.is_terminal():
        job.finished_at = now
        job.error = error if target is JobStatus.FAILED else None
    add_event(
        session,
        job.id,
        message,
        level="error" if target is JobStatus.FAILED else "info",
        data={"status": target.value, **({"error": error} if error else {})},
        # A resumed job passes through queued and running again: one event each time.
        dedupe_key=f"status:{target.value}" + (f":{job.resumes}" if job.resumes else ""),
    )
    return True


def submission_id(job: Job) -> str:
    """The Ray submission of the job's current run: the job id, then one per resume (the
    run's checkpoints stay under the job id, so each resumes where the last one stopped)."""
    return job.id if not job.resumes else f"{job.id}-resume-{job.resumes}"


def pause_job(session: Session, settings: Settings, *, project_id: str, job_id: str) -> Job:
    """Ask a running job's run to checkpoint and stop (pausing; paused once it has). A
    repeated pause while it is pausing changes nothing; any other status is a 409."""
    job = get_job(session, project_id=project_id, job_id=job_id, lock=True)
    if job.status == JobStatus.PAUSING.value:
        return job
    if job.status != JobStatus.RUNNING.value:
        raise Conflict(
            f"job {job_id} is {job.status}; only a running job can be paused",
            param="fine_tuning_job_id",
        )
    request_pause(settings.storage_path, job.id)
    set_status(
        session, job, JobStatus.PAUSING,
        message="Pause requested; the run checkpoints and stops after its current step",
    )  # fmt: skip
    return job


def resume_job(session: Session, settings: Settings, *, project_id: str, job_id: str) -> Job:
    """Queue a paused job again; its new run resumes from the checkpoint the pause wrote
    (launched like a new job, by ``advance_job``). Any status but paused is a 409."""
    job = get_job(session, project_id=project_id, job_id=job_id, lock=True)
    if job.status != JobStatus.PAUSED.value:
        raise Conflict(
            f"job {job_id} is {job.status}; only a paused job can be resumed",
            param="fine_tuning_job_id",
        )
    clear_pause(settings.storage_path, job.id)
    step = session.scalar(select(func.max(Checkpoint.step)).where(Checkpoint.job_id == job.id))
    where = f"its checkpoint at step {step}" if step is not None else "its latest checkpoint"
    set_status(session, job, JobStatus.QUEUED, message=f"Job resumed from {where}; queued")
    return job


def cancel_job(session: Session, *, project_id: str, job_id: str) -> tuple[Job, bool]:
    """Cancel a job; returns the job and whether a launched run must be stopped."""
    job = get_job(session, project_id=project_id, job_id=job_id, lock=True)
    target = cancel_target(
        JobStatus(job.status),
        # a paused job has no run: it is cancelled at once
        launched=job.submitted_at is not None and job.status != JobStatus.PAUSED.value,
        what=f"job {job_id}",
        param="fine_tuning_job_id",
    )
    if target is JobStatus.CANCELLED:
        set_status(session, job, target, message="Job cancelled before it was launched")
    elif target is JobStatus.CANCELLING:
        set_status(session, job, target, message="Cancellation requested; stopping the run")
    return job, target is not JobStatus.CANCELLED


def fail(
    session: Session, job: Job, kind: FailureKind, message: str, param: str | None = None
) -> None:
    set_status(
        session,
        job,
        JobStatus.FAILED,
        message=f"Job failed: {message}",
        error={"code": kind.value, "message": message, "param": param},
    )


def advance_job(sessions: sessionmaker[Session], launcher: JobLauncher, job_id: str) -> None:
    """Validate and launch a new job. Safe to call any number of times, from anywhere."""
    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
    if job is not None and job.status == JobStatus.VALIDATING_FILES.value:
        # Read the whole dataset with no transaction open (on SQLite a write transaction
        # holds every other request); then record the outcome in a short one.
        outcome = _check_job_dataset(job)
        with sessions.begin() as session:
            row = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
            if row is not None and row.status == JobStatus.VALIDATING_FILES.value:
                _record_validation(session, row, outcome)
    with sessions.begin() as session:
        claimed = session.execute(  # type: ignore[attr-defined]
            update(Job)
            .where(
                Job.id == job_id, Job.status == JobStatus.QUEUED.value, Job.submitted_at.is_(None)
            )
            .values(submitted_at=utcnow())
        ).rowcount
        job = session.scalar(select(Job).where(Job.id == job_id))
    if claimed and job is not None:
        submit(sessions, launcher, job)


def _check_job_dataset(job: Job) -> DatasetInfo | InvalidFile:
    """The job's training data validated, or why it is not valid."""
    path = Path(job.dataset_path)
    try:
        if not path.exists():
            raise InvalidFile(f"the training data at {path} is gone", param="training_file")
        info = validate_dataset(path)
        if job.dataset_sha256 and info.sha256 != job.dataset_sha256:
            raise InvalidFile("the training file changed after upload", param="training_file")
    except InvalidFile as exc:
        return exc
    except OSError as exc:
        return InvalidFile(f"cannot read the training data: {exc}")
    return info


def _record_validation(session: Session, job: Job, outcome: DatasetInfo | InvalidFile) -> None:
    if isinstance(outcome, InvalidFile):
        fail(session, job, FailureKind.INVALID_FILE, outcome.message, outcome.param)
        return
    job.dataset_sha256 = outcome.sha256
    if job.hyperparameter_choices:
        _apply_auto(session, job, outcome.num_records)
    set_status(
        session,
        job,
        JobStatus.QUEUED,
        message=f"Training file validated ({outcome.num_records} {outcome.format.value} "
        "records); job queued",
    )


def _apply_auto(session: Session, job: Job, n_records: int) -> None:
    choices = job.hyperparameter_choices or {}
    hyper = resolve_auto(job.config, choices, n_records)
    multiplier = hyper.pop("learning_rate_multiplier", None)
    job.config = {**job.config, "hyperparameters": hyper}
    chosen: dict[str, Any] = {k: hyper[k] for k in ("n_epochs", "batch_size") if k in choices}
    if multiplier is not None:
        chosen["learning_rate_multiplier"] = multiplier
    job.hyperparameter_choices = {**chosen, "resolved": True}
    shown = ", ".join(f"{k}={v:.4g}" for k, v in chosen.items())
    add_event(
        session, job.id, f"Hyperparameters for {n_records} records: {shown} (learning_rate="
        f"{hyper['learning_rate']:.4g})", data={**chosen, "records": n_records},
        dedupe_key="auto",
    )  # fmt: skip


def submit(sessions: sessionmaker[Session], launcher: JobLauncher, job: Job) -> None:
    def failed(message: str, kind: FailureKind = FailureKind.LAUNCH_FAILED) -> None:
        param = "resources" if kind is FailureKind.INSUFFICIENT_RESOURCES else None
        with sessions.begin() as session:
            row = session.scalar(select(Job).where(Job.id == job.id).with_for_update())
            if row is not None:
                fail(session, row, kind, message, param)

    def too_large(message: str) -> None:
        failed(message, FailureKind.INSUFFICIENT_RESOURCES)

    def launched() -> bool:
        with sessions.begin() as session:
            add_event(session, job.id, "Submitted to the cluster", dedupe_key="submitted")
            status = session.scalar(select(Job.status).where(Job.id == job.id))
        return status is not None and is_cancelled(status)

    spec = TrainingLaunch(job_id=job.id, config=job.config, submission=submission_id(job))
    launch_run(launcher, spec, failed=failed, launched=launched, too_large=too_large)
