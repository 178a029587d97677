"""/v1/fine_tuning/jobs: create, list, get, cancel, pause, resume, events, checkpoints and an
MoE job's expert-load heatmap."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Request
from fastapi.responses import JSONResponse, Response

from thinkforge.platform import jobs
from thinkforge.platform.deps import (
    AfterQuery,
    CtxDep,
    IdempotencyKeyDep,
    KeyFirstRoute,
    LimitQuery,
    PrincipalDep,
)
from thinkforge.platform.errors import InvalidRequest
from thinkforge.platform.idempotency import fingerprint, run_idempotent
from thinkforge.platform.models import Checkpoint, JobEvent
from thinkforge.platform.routes.common import cancel_run
from thinkforge.platform.schemas import (
    CheckpointObject,
    FineTuningJob,
    JobCreate,
    JobEventObject,
    ListResponse,
)
from thinkforge.platform.views import checkpoint_view, event_view, job_view

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], route_class=KeyFirstRoute)
_METADATA_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@router.post("", response_model=FineTuningJob)
def create_job(
    ctx: CtxDep,
    principal: PrincipalDep,
    spec: JobCreate,
    background: BackgroundTasks,
    idempotency_key: IdempotencyKeyDep = None,
) -> JSONResponse:
    def handler(session):  # type: ignore[no-untyped-def]
        job = jobs.create_job(
            session, ctx.settings, project_id=principal.project_id, spec=spec,
            registry=ctx.registry(),
        )  # fmt: skip
        return 200, job_view(job).model_dump(mode="json")

    status, body = run_idempotent(
        ctx.sessions,
        project_id=principal.project_id,
        key=idempotency_key,
        method="POST",
        path="/v1/fine_tuning/jobs",
        request_fingerprint=fingerprint(spec.model_dump(mode="json", exclude_unset=True)),
        ttl_s=ctx.settings.idempotency_ttl_s,
        handler=handler,
    )
    background.add_task(jobs.advance_job, ctx.sessions, ctx.launcher, body["id"])
    return JSONResponse(body, status_code=status)


@router.get("", response_model=ListResponse[FineTuningJob])
def list_jobs(
    request: Request,
    ctx: CtxDep,
    principal: PrincipalDep,
    after: AfterQuery = None,
    limit: LimitQuery = 20,
) -> ListResponse[FineTuningJob]:
    metadata = _metadata_filter(request)
    with ctx.sessions() as session:
        rows, more = jobs.list_jobs(
            session, project_id=principal.project_id, after=after, limit=limit, metadata=metadata
        )
        data = [job_view(r) for r in rows]
    return ListResponse.of(data, more)


def _metadata_filter(request: Request) -> dict[str, str]:
    """``?metadata[team]=nlp`` (OpenAI's form) filters on one metadata key."""
    found = {}
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            key = name[len("metadata[") : -1]
            if not _METADATA_KEY.fullmatch(key) or "\x00" in value:
                raise InvalidRequest(
                    "metadata filter keys are 1 to 64 letters, digits, '_', '.' or '-'", param=name
                )
            found[key] = value
    return found


@router.get("/{job_id}", response_model=FineTuningJob)
def get_job(ctx: CtxDep, principal: PrincipalDep, job_id: str) -> FineTuningJob:
    with ctx.sessions() as session:
        return job_view(jobs.get_job(session, project_id=principal.project_id, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=FineTuningJob)
def cancel_job(
    ctx: CtxDep, principal: PrincipalDep, job_id: str, idempotency_key: IdempotencyKeyDep = None
) -> JSONResponse:
    return cancel_run(
        ctx, project_id=principal.project_id, run_id=job_id,
        path=f"/v1/fine_tuning/jobs/{job_id}/cancel", idempotency_key=idempotency_key,
        view=job_view, submission=jobs.submission_id,
        cancel=lambda s: jobs.cancel_job(s, project_id=principal.project_id, job_id=job_id),
    )  # fmt: skip


@router.post("/{job_id}/pause", response_model=FineTuningJob)
def pause_job(
    ctx: CtxDep, principal: PrincipalDep, job_id: str, idempotency_key: IdempotencyKeyDep = None
) -> JSONResponse:
    return _change(
        ctx, principal, job_id, "pause", idempotency_key,
        lambda s: jobs.pause_job(s, ctx.settings, project_id=principal.project_id, job_id=job_id),
    )  # fmt: skip


@router.post("/{job_id}/resume", response_model=FineTuningJob)
def resume_job(
    ctx: CtxDep,
    principal: PrincipalDep,
    job_id: str,
    background: BackgroundTasks,
    idempotency_key: IdempotencyKeyDep = None,
) -> JSONResponse:
    response = _change(
        ctx, principal, job_id, "resume", idempotency_key,
        lambda s: jobs.resume_job(s, ctx.settings, project_id=principal.project_id, job_id=job_id),
    )  # fmt: skip
    background.add_task(jobs.advance_job, ctx.sessions, ctx.launcher, job_id)
    return response


def _change(
    ctx: CtxDep,
    principal: PrincipalDep,
    job_id: str,
    action: str,
    idempotency_key: str | None,
    change: Callable[[Any], Any],
) -> JSONResponse:
    """``POST .../{action}``: one idempotent transaction, answered with the job."""
    status, body = run_idempotent(
        ctx.sessions, project_id=principal.project_id, key=idempotency_key, method="POST",
        path=f"/v1/fine_tuning/jobs/{job_id}/{action}",
        request_fingerprint=fingerprint(job_id, action), ttl_s=ctx.settings.idempotency_ttl_s,
        handler=lambda session: (200, job_view(change(session)).model_dump(mode="json")),
    )  # fmt: skip
    return JSONResponse(body, status_code=status)


@router.get("/{job_id}/events", response_model=ListResponse[JobEventObject])
def list_events(
    ctx: CtxDep,
    principal: PrincipalDep,
    job_id: str,
    after: AfterQuery = None,
    limit: LimitQuery = 20,
) -> ListResponse[JobEventObject]:
    return _job_rows(ctx, principal, job_id, JobEvent, event_view, after, limit)


@router.get("/{job_id}/checkpoints", response_model=ListResponse[CheckpointObject])
def list_checkpoints(
    ctx: CtxDep,
    principal: PrincipalDep,
    job_id: str,
    after: AfterQuery = None,
    limit: LimitQuery = 20,
) -> ListResponse[CheckpointObject]:
    return _job_rows(ctx, principal, job_id, Checkpoint, checkpoint_view, after, limit)


@router.get(
    "/{job_id}/experts.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "expert load by layer"}},
)
def expert_heatmap(ctx: CtxDep, principal: PrincipalDep, job_id: str) -> Response:
    png = jobs.expert_heatmap(
        ctx.sessions, ctx.tracker, project_id=principal.project_id, job_id=job_id
    )
    return Response(png, media_type="image/png")


def _job_rows(
    ctx: CtxDep,
    principal: PrincipalDep,
    job_id: str,
    model: type[JobEvent] | type[Checkpoint],
    view: Callable[[Any], Any],
    after: str | None,
    limit: int,
) -> ListResponse[Any]:
    with ctx.sessions() as session:
        rows, more = jobs.list_job_rows(
            session, model, project_id=principal.project_id, job_id=job_id, after=after,
            limit=limit,
        )  # fmt: skip
        return ListResponse.of([view(r) for r in rows], more)
