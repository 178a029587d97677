"""Rows to public shapes: the one place ORM rows (and the registry's records) turn into
API objects. Routes call these; nothing else builds a response object."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from thinkforge.contract import OPENAI_CHECKPOINT_METRICS
from thinkforge.jobs.config import LoRA, Resources
from thinkforge.platform.models import (
    ApiKey,
    AuditEntry,
    Checkpoint,
    Deployment,
    Distillation,
    DistillEvent,
    Evaluation,
    File,
    Job,
    JobEvent,
)
from thinkforge.platform.promotions import AliasMove
from thinkforge.platform.registry import ModelVersionDetail, ModelVersionInfo, RegisteredModelInfo
from thinkforge.platform.schemas import (
    AliasObject,
    AuditObject,
    CheckpointObject,
    DeploymentObject,
    DistillEventObject,
    DistillObject,
    EvalObject,
    FileObject,
    FineTuningJob,
    JobError,
    JobEventObject,
    JobHyperparameters,
    KeyObject,
    Method,
    ModelObject,
    ModelVersionObject,
    RegisteredModelObject,
    SupervisedMethod,
)
from thinkforge.platform.status import EvalStatus


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


def _lora(row: Job) -> LoRA | None:
    raw = row.config.get("lora")
    return LoRA.model_validate(raw) if raw is not None else None


def job_view(row: Job) -> FineTuningJob:
    """The job as OpenAI shows one: "auto" hyperparameters stay "auto" until the training
    file is validated, then show what they resolved to."""
    choices = row.hyperparameter_choices or {}
    values = dict(row.config.get("hyperparameters", {}))
    values["learning_rate_multiplier"] = choices.get("learning_rate_multiplier")
    if not choices.get("resolved"):
        values |= {k: v for k, v in choices.items() if v == "auto"}
    hyper = JobHyperparameters.model_validate(values)
    return FineTuningJob(
        id=row.id,
        model=row.model,
        created_at=int(row.created_at.timestamp()),
        finished_at=ts(row.finished_at),
        started_at=ts(row.started_at),
        fine_tuned_model=row.fine_tuned_model,
        organization_id=row.project_id,
        result_files=row.result_files or [],
        estimated_finish=ts(row.estimated_finish) if row.status == "running" else None,
        status=row.status,
        validation_file=row.validation_file,
        training_file=row.training_file,
        hyperparameters=hyper,
        method=Method(supervised=SupervisedMethod(hyperparameters=hyper, lora=_lora(row))),
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
        metrics=openai_metrics(row.metrics or {}),
    )


def openai_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's metrics under our names and, beside them, OpenAI's."""
    named = {o: metrics[t] for o, t in OPENAI_CHECKPOINT_METRICS.items() if t in metrics}
    if "step" in metrics:
        named["step"] = int(metrics["step"])
    return {**metrics, **named}


def eval_view(row: Evaluation) -> EvalObject:
    succeeded = row.status == EvalStatus.SUCCEEDED
    return EvalObject(
        id=row.id, status=row.status, deployment=row.deployment, model_version=row.model_version,
        budgets=row.summary, best_accuracy=row.best_accuracy, mlflow_run_id=row.mlflow_run_id,
        plot_url=f"/v1/evals/{row.id}/plot.png" if succeeded else None,
        error=row.error, config=row.config, created_at=ts(row.created_at) or 0,
        finished_at=ts(row.finished_at),
    )  # fmt: skip


def distill_view(row: Distillation) -> DistillObject:
    """A distillation: its lineage (teacher, filters, seed) and what each stage kept."""
    config = row.config
    return DistillObject(
        id=row.id, status=row.status, question_file=row.question_file, teacher=row.teacher,
        samples=config["samples"], thinking=config.get("thinking") or {},
        temperature=config["temperature"], seed=config["seed"],
        curation={k: v for k, v in config["curation"].items() if k != "weaker"},
        counts=row.counts, stages=row.stages, output_file=row.output_file,
        traces_file=row.traces_file, mlflow_run_id=row.mlflow_run_id, error=row.error,
        created_at=ts(row.created_at) or 0, finished_at=ts(row.finished_at),
    )  # fmt: skip


def distill_event_view(row: DistillEvent) -> DistillEventObject:
    return DistillEventObject(
        id=row.id, created_at=int(row.created_at.timestamp()), level=row.level, type=row.type,
        message=row.message, data=row.data,
    )  # fmt: skip


def deployment_view(row: Deployment) -> DeploymentObject:
    return DeploymentObject(
        id=row.id, name=row.name, model=row.model, engine=row.engine, status=row.status,
        served_version=row.served_version, message=row.message, config=row.config,
        public=row.public, created_at=ts(row.created_at) or 0,
        updated_at=ts(row.updated_at) or 0,
    )  # fmt: skip


def served_model_view(row: Deployment) -> ModelObject:
    return ModelObject(id=row.name, created=ts(row.created_at) or 0, owned_by=row.project_id)


def registered_version_model_view(v: ModelVersionInfo) -> ModelObject:
    return ModelObject(
        id=f"{v.name}/{v.version}", created=ts(v.created_at) or 0, owned_by="registry"
    )


def audit_view(row: AuditEntry) -> AuditObject:
    return AuditObject(
        id=row.id, created_at=int(row.created_at.timestamp()), actor=row.actor,
        action=row.action, target=row.target, from_value=row.from_value, to_value=row.to_value,
        reason=row.reason,
    )  # fmt: skip


def registered_model_view(model: RegisteredModelInfo) -> RegisteredModelObject:
    return RegisteredModelObject(
        name=model.name, description=model.description or "", created_at=ts(model.created_at) or 0,
        updated_at=ts(model.updated_at), aliases=model.aliases, latest_version=model.latest_version,
        tags=model.tags,
    )  # fmt: skip


def version_view(v: ModelVersionInfo, *, run_url: str | None = None) -> ModelVersionObject:
    """A version; a ``ModelVersionDetail`` adds lineage, metrics, params, manifest and the
    link to its MLflow run (``run_url``)."""
    view = ModelVersionObject(
        id=f"{v.name}/{v.version}", name=v.name, version=v.version, status=v.status.value,
        status_message=v.status_message or "", created_at=ts(v.created_at) or 0,
        aliases=v.aliases, run_id=v.run_id, source=v.source, tags=v.tags,
    )  # fmt: skip
    if isinstance(v, ModelVersionDetail):
        view.lineage = v.lineage
        view.metrics = v.metrics
        view.params = v.params
        view.manifest = dict(v.manifest) if v.manifest is not None else None
        view.mlflow_run_url = run_url
    return view


def alias_view(move: AliasMove) -> AliasObject:
    return AliasObject(
        name=move.name, alias=move.alias, version=move.version,
        previous_version=move.previous, audit_id=move.audit_id,
    )  # fmt: skip


def key_view(row: ApiKey) -> KeyObject:
    return KeyObject(
        id=row.id, name=row.name, prefix=row.prefix, role=row.role,
        created_at=int(row.created_at.timestamp()), revoked_at=ts(row.revoked_at),
    )  # fmt: skip
