"""/v1/deployments: serve registry versions on Ray Serve; /v1/models: what can be served."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse

from thinkforge.platform import deployments
from thinkforge.platform.deps import CtxDep, IdempotencyKeyDep, KeyFirstRoute, PrincipalDep
from thinkforge.platform.errors import PlatformError
from thinkforge.platform.idempotency import fingerprint, run_idempotent_action
from thinkforge.platform.registry import all_models, all_versions
from thinkforge.platform.schemas import (
    DeploymentCreate,
    DeploymentDeleted,
    DeploymentObject,
    DeploymentUpdate,
    ListResponse,
    ModelObject,
)
from thinkforge.platform.views import (
    deployment_view,
    registered_version_model_view,
    served_model_view,
)

router = APIRouter(prefix="/v1", tags=["deployments"], route_class=KeyFirstRoute)
log = logging.getLogger(__name__)
NamePath = Annotated[str, Path(max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


@router.post("/deployments", response_model=DeploymentObject)
def create(
    ctx: CtxDep,
    principal: PrincipalDep,
    body: DeploymentCreate,
    idempotency_key: IdempotencyKeyDep = None,
) -> JSONResponse:
    options = body.given()
    options.pop("name"), options.pop("model")
    manager = ctx.deployments()  # 503 before anything is written when serving is off

    def action() -> tuple[int, dict[str, Any]]:
        with ctx.sessions.begin() as session:
            row = deployments.create_deployment(
                session, ctx.registry_for(principal.project_id), project_id=principal.project_id,
                name=body.name, model=body.model, options=options,
            )  # fmt: skip
        _apply_now(manager)
        return 200, _view_by_name(ctx, principal.project_id, row.name).model_dump(mode="json")

    status, view = run_idempotent_action(
        ctx.sessions, project_id=principal.project_id, key=idempotency_key, method="POST",
        path="/v1/deployments", request_fingerprint=fingerprint(body.model_dump(mode="json")),
        ttl_s=ctx.settings.idempotency_ttl_s, action=action,
    )  # fmt: skip
    return JSONResponse(view, status_code=status)


@router.get("/deployments", response_model=ListResponse[DeploymentObject])
def list_deployments(ctx: CtxDep, principal: PrincipalDep) -> ListResponse[DeploymentObject]:
    with ctx.sessions() as session:
        rows = deployments.list_deployments(session, project_id=principal.project_id)
        data = [deployment_view(r) for r in rows]
    return ListResponse[DeploymentObject].of(data, False)


@router.get("/deployments/{name}", response_model=DeploymentObject)
def get(ctx: CtxDep, principal: PrincipalDep, name: NamePath) -> DeploymentObject:
    return _view_by_name(ctx, principal.project_id, name)


@router.patch("/deployments/{name}", response_model=DeploymentObject)
def update(
    ctx: CtxDep, principal: PrincipalDep, name: NamePath, body: DeploymentUpdate
) -> DeploymentObject:
    options = body.given()
    model = options.pop("model", None)
    manager = ctx.deployments()
    with ctx.sessions.begin() as session:
        deployments.update_deployment(
            session, ctx.registry_for(principal.project_id), project_id=principal.project_id,
            name=name, model=model, options=options,
        )  # fmt: skip
    _apply_now(manager)
    return _view_by_name(ctx, principal.project_id, name)


@router.delete("/deployments/{name}", response_model=DeploymentDeleted)
def delete(ctx: CtxDep, principal: PrincipalDep, name: NamePath) -> DeploymentDeleted:
    manager = ctx.deployments()
    with ctx.sessions.begin() as session:
        row_id = deployments.delete_deployment(
            session, project_id=principal.project_id, name=name
        ).id
    _apply_now(manager)
    return DeploymentDeleted(id=row_id)


@router.get("/models", response_model=ListResponse[ModelObject])
def list_models(ctx: CtxDep, principal: PrincipalDep) -> ListResponse[ModelObject]:
    """OpenAI's model list: live deployments, then every registered version."""
    with ctx.sessions() as session:
        rows = deployments.list_deployments(session, project_id=principal.project_id)
        data = [served_model_view(r) for r in reversed(rows)]  # oldest first
    registry = ctx.registry_for(principal.project_id)
    for model in all_models(registry):
        data += [registered_version_model_view(v) for v in all_versions(registry, model.name)]
    return ListResponse[ModelObject].of(data, False)


def _view_by_name(ctx: CtxDep, project_id: str, name: str) -> DeploymentObject:
    with ctx.sessions() as session:
        return deployment_view(
            deployments.get_deployment(session, project_id=project_id, name=name)
        )


def _apply_now(manager: deployments.DeploymentManager) -> None:
    """Apply at once; if Serve is unreachable the reconciler applies it on a later pass."""
    try:
        manager.reconcile()
    except PlatformError as exc:
        log.warning("applying deployments now failed (the reconciler retries): %s", exc)
