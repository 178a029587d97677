"""/v1/datasets/distill: teacher traces for a question file, verified and curated into a
training file; their events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Path
from fastapi.responses import JSONResponse

from thinkforge.platform import distill
from thinkforge.platform.deps import (
    AfterQuery,
    CtxDep,
    IdempotencyKeyDep,
    KeyFirstRoute,
    LimitQuery,
    PrincipalDep,
)
from thinkforge.platform.idempotency import fingerprint, run_idempotent
from thinkforge.platform.routes.common import cancel_run
from thinkforge.platform.schemas import (
    DistillCreate,
    DistillEventObject,
    DistillObject,
    ListResponse,
)
from thinkforge.platform.views import distill_event_view, distill_view

router = APIRouter(prefix="/v1/datasets/distill", tags=["distillation"], route_class=KeyFirstRoute)
DistillId = Annotated[str, Path(max_length=40, pattern=r"^distill-[0-9a-f]+$")]


@router.post("", response_model=DistillObject)
def create(
    ctx: CtxDep,
    principal: PrincipalDep,
    body: DistillCreate,
    background: BackgroundTasks,
    idempotency_key: IdempotencyKeyDep = None,
) -> JSONResponse:
    # Resolved before the transaction: the registry's project check reads the database too.
    refs = [m.version for m in (body.teacher, body.curation.weaker) if m and m.version]
    registry = ctx.registry_for(principal.project_id) if refs else None
    versions = {ref: registry.resolve(ref) for ref in refs} if registry else {}

    def handler(session):  # type: ignore[no-untyped-def]
        row = distill.create_distillation(
            session, ctx.settings, project_id=principal.project_id, spec=body, versions=versions
        )
        return 200, distill_view(row).model_dump(mode="json")

    status, view = run_idempotent(
        ctx.sessions, project_id=principal.project_id, key=idempotency_key, method="POST",
        path="/v1/datasets/distill", request_fingerprint=fingerprint(body.model_dump(mode="json")),
        ttl_s=ctx.settings.idempotency_ttl_s, handler=handler,
    )  # fmt: skip
    background.add_task(distill.reconcile_distills, ctx.sessions, ctx.launcher, ctx.settings)
    return JSONResponse(view, status_code=status)


@router.post("/{distill_id}/cancel", response_model=DistillObject)
def cancel(
    ctx: CtxDep,
    principal: PrincipalDep,
    distill_id: DistillId,
    idempotency_key: IdempotencyKeyDep = None,
) -> JSONResponse:
    return cancel_run(
        ctx, project_id=principal.project_id, run_id=distill_id,
        path=f"/v1/datasets/distill/{distill_id}/cancel", idempotency_key=idempotency_key,
        view=distill_view,
        cancel=lambda s: distill.cancel_distillation(
            s, project_id=principal.project_id, distill_id=distill_id
        ),
    )  # fmt: skip


@router.get("", response_model=ListResponse[DistillObject])
def list_distillations(
    ctx: CtxDep, principal: PrincipalDep, after: AfterQuery = None, limit: LimitQuery = 20
) -> ListResponse[DistillObject]:
    with ctx.sessions() as session:
        rows, more = distill.list_distillations(
            session, project_id=principal.project_id, after=after, limit=limit
        )
        return ListResponse[DistillObject].of([distill_view(r) for r in rows], more)


@router.get("/{distill_id}", response_model=DistillObject)
def get(ctx: CtxDep, principal: PrincipalDep, distill_id: DistillId) -> DistillObject:
    with ctx.sessions() as session:
        return distill_view(
            distill.get_distillation(
                session, project_id=principal.project_id, distill_id=distill_id
            )
        )


@router.get("/{distill_id}/events", response_model=ListResponse[DistillEventObject])
def list_events(
    ctx: CtxDep,
    principal: PrincipalDep,
    distill_id: DistillId,
    after: AfterQuery = None,
    limit: LimitQuery = 20,
) -> ListResponse[DistillEventObject]:
    with ctx.sessions() as session:
        rows, more = distill.list_events(
            session, project_id=principal.project_id, distill_id=distill_id, after=after,
            limit=limit,
        )  # fmt: skip
        return ListResponse[DistillEventObject].of([distill_event_view(r) for r in rows], more)
