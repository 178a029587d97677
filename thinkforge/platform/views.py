"""Rows to public shapes: the one place ORM rows turn into API objects."""

from __future__ import annotations

from datetime import datetime

from thinkforge.jobs.config import Hyperparameters, Resources
from thinkforge.platform.models import Checkpoint, File, Job, JobEvent
from thinkforge.platform.schemas import (
    CheckpointObject,
    FileObject,
    FineTuningJob,
    JobError,
    JobEventObject,
    Method,
    SupervisedMethod,
)


def ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def file_view(row: File) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=int(row.created_at.timestamp()),
        filename=row.filename,
        purpose=row.purpose,
        format=row.format,
        num_records=row.num_records,
        sha256=row.sha256,
    )


def job_view(row: Job) -> FineTuningJob:
    hyper = Hyperparameters.model_validate(row.config.get("hyperparameters", {}))
    return FineTuningJob(
        id=row.id,
        model=row.model,
        created_at=int(row.created_at.timestamp()),
        finished_at=ts(row.finished_at),
        started_at=ts(row.started_at),
        fine_tuned_model=row.fine_tuned_model,
        organization_id=row.project_id,
        status=row.status,
        validation_file=row.validation_file,
        training_file=row.training_file,
        hyperparameters=hyper,
        method=Method(supervised=SupervisedMethod(hyperparameters=hyper)),
        trained_tokens=row.trained_tokens,
        error=JobError.model_validate(row.error) if row.error else None,
        user_provided_suffix=row.suffix,
        seed=row.seed,
        metadata=row.user_metadata,
        recipe=row.recipe,
        resources=Resources.model_validate(row.config.get("resources", {})),
        config=row.config,
        mlflow_run_id=row.mlflow_run_id,
        max_retries=row.max_retries,
        retries=row.retries,
    )


def event_view(row: JobEvent) -> JobEventObject:
    return JobEventObject(
        id=row.id,
        created_at=int(row.created_at.timestamp()),
        level=row.level,
        message=row.message,
        type=row.type,
        data=row.data,
    )


def checkpoint_view(row: Checkpoint) -> CheckpointObject:
    return CheckpointObject(
        id=row.id,
        created_at=int(row.created_at.timestamp()),
        fine_tuning_job_id=row.job_id,
        fine_tuned_model_checkpoint=row.path,
        step_number=row.step,
        metrics=row.metrics or {},
    )
