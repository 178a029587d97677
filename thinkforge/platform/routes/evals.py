"""/v1/evals: thinking-budget sweeps over a deployment, their results and scaling plot."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Path
from fastapi.responses import FileResponse, JSONResponse

from thinkforge.platform import evals
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
from thinkforge.platform.schemas import EvalCreate, EvalObject, ListResponse
from thinkforge.platform.views import eval_view

router = APIRouter(prefix="/v1/evals", tags=["evaluations"], route_class=KeyFirstRoute)
EvalId = Annotated[str, Path(max_length=40, pattern=r"^eval-[0-9a-f]+$")]


@router.post("", response_model=EvalObject)
def create(
    ctx: CtxDep,
    principal: PrincipalDep,
    body: EvalCreate,
    background: BackgroundTasks,
    idempotency_key: IdempotencyKeyDep = None,
) -> JSONResponse:
    # Resolved before the transaction: the registry's project check reads the database too.
    version = ctx.registry_for(principal.project_id).resolve(body.model) if body.model else None

    def handler(session):  # type: ignore[no-untyped-def]
        row = evals.create_eval(
            session, ctx.settings, project_id=principal.project_id, spec=body, version=version
        )
        return 200, eval_view(row).model_dump(mode="json")

    status, view = run_idempotent(
        ctx.sessions, project_id=principal.project_id, key=idempotency_key, method="POST",
        path="/v1/evals", request_fingerprint=fingerprint(body.model_dump(mode="json")),
        ttl_s=ctx.settings.idempotency_ttl_s, handler=handler,
    )  # fmt: skip
    background.add_task(evals.reconcile_evals, ctx.sessions, ctx.launcher, ctx.settings)
    return JSONResponse(view, status_code=status)


@router.post("/{eval_id}/cancel", response_model=EvalObject)
def cancel(
    ctx: CtxDep, principal: PrincipalDep, eval_id: EvalId, idempotency_key: IdempotencyKeyDep = None
) -> JSONResponse:
    return cancel_run(
        ctx, project_id=principal.project_id, run_id=eval_id, path=f"/v1/evals/{eval_id}/cancel",
        idempotency_key=idempotency_key, view=eval_view,
        cancel=lambda s: evals.cancel_eval(s, project_id=principal.project_id, eval_id=eval_id),
    )  # fmt: skip


@router.get("", response_model=ListResponse[EvalObject])
def list_evals(
    ctx: CtxDep, principal: PrincipalDep, after: AfterQuery = None, limit: LimitQuery = 20
) -> ListResponse[EvalObject]:
    with ctx.sessions() as session:
        rows, more = evals.list_evals(
            session, project_id=principal.project_id, after=after, limit=limit
        )
        return ListResponse[EvalObject].of([eval_view(r) for r in rows], more)


@router.get("/{eval_id}", response_model=EvalObject)
def get(ctx: CtxDep, principal: PrincipalDep, eval_id: EvalId) -> EvalObject:
    with ctx.sessions() as session:
        return eval_view(evals.get_eval(session, project_id=principal.project_id, eval_id=eval_id))


@router.get("/{eval_id}/plot.png", response_class=FileResponse)
def plot(ctx: CtxDep, principal: PrincipalDep, eval_id: EvalId) -> FileResponse:
    with ctx.sessions() as session:
        row = evals.get_eval(session, project_id=principal.project_id, eval_id=eval_id)
        path = evals.plot_path(row)
    return FileResponse(path, media_type="image/png")
