"""/v1/registry: registered models and versions with lineage, as the key's project sees them
(another project's models look absent: see ``ownership``); aliases moved with checks."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse

from thinkforge.contract import DATASET_SHA_TAG
from thinkforge.platform import promotions
from thinkforge.platform.auth import Principal
from thinkforge.platform.deps import (
    AfterQuery,
    CtxDep,
    IdempotencyKeyDep,
    KeyFirstRoute,
    LimitQuery,
    PrincipalDep,
)
from thinkforge.platform.distill import lineage_for
from thinkforge.platform.idempotency import fingerprint, run_idempotent_action
from thinkforge.platform.ownership import ScopedRegistry
from thinkforge.platform.registry import ModelVersionInfo, all_versions
from thinkforge.platform.schemas import (
    AliasAction,
    AliasMoveCreate,
    AliasObject,
    AuditObject,
    ListResponse,
    ModelVersionObject,
    RegisteredModelObject,
)
from thinkforge.platform.views import (
    alias_view,
    audit_view,
    registered_model_view,
    version_view,
)

router = APIRouter(prefix="/v1", tags=["registry"], route_class=KeyFirstRoute)
NamePath = Annotated[str, Path(max_length=256, pattern=r"^[^\x00/]+$")]
AliasPath = Annotated[str, Path(max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")]


@router.get("/registry/models", response_model=ListResponse[RegisteredModelObject])
def list_models(
    ctx: CtxDep,
    principal: PrincipalDep,
    limit: LimitQuery = 20,
    page_token: Annotated[str | None, Query(max_length=512)] = None,
) -> ListResponse[RegisteredModelObject]:
    registry = ctx.registry_for(principal.project_id)
    found = registry.list_models(max_results=limit, page_token=page_token)
    data = [registered_model_view(m) for m in found.items]
    listing = ListResponse[RegisteredModelObject].of(data, found.next_page_token is not None)
    listing.last_id = found.next_page_token
    return listing


@router.get("/registry/models/{name}", response_model=RegisteredModelObject)
def get_model(ctx: CtxDep, principal: PrincipalDep, name: NamePath) -> RegisteredModelObject:
    return registered_model_view(ctx.registry_for(principal.project_id).get_model(name))


@router.get("/registry/models/{name}/versions", response_model=ListResponse[ModelVersionObject])
def list_versions(
    ctx: CtxDep, principal: PrincipalDep, name: NamePath,
    after: Annotated[int | None, Query(ge=1, description="versions below this one")] = None,
    limit: LimitQuery = 20,
) -> ListResponse[ModelVersionObject]:  # fmt: skip
    # Newest first; a registered model has few enough versions to walk.
    walked = all_versions(ctx.registry_for(principal.project_id), name)
    versions = [v for v in walked if after is None or v.version < after]
    data = [_version_view(ctx, v) for v in versions[:limit]]
    return ListResponse[ModelVersionObject].of(data, len(versions) > limit)


@router.get("/registry/models/{name}/versions/{version}", response_model=ModelVersionObject)
def get_version(
    ctx: CtxDep,
    principal: PrincipalDep,
    name: NamePath,
    version: Annotated[int, Path(ge=1, le=2**31 - 1)],
) -> ModelVersionObject:
    registry = ctx.registry_for(principal.project_id)
    view = _version_view(ctx, registry.get_version(name, version))
    if view.lineage is not None:  # trained on a distilled file: that distillation too
        with ctx.sessions() as session:
            view.lineage |= lineage_for(
                session, project_id=principal.project_id,
                dataset_sha256=view.lineage.get(DATASET_SHA_TAG),
            )  # fmt: skip
    return view


@router.put("/registry/models/{name}/aliases/{alias}", response_model=AliasObject)
def promote(
    ctx: CtxDep, principal: PrincipalDep, name: NamePath, alias: AliasPath, body: AliasMoveCreate
) -> AliasObject:
    registry = _alias_registry(ctx, principal, name)
    move = promotions.promote(
        ctx.sessions, registry, actor=principal, name=name, alias=alias,
        version=body.version, reason=body.reason, on_moved=ctx.on_alias_moved,
        policy=ctx.promotion_policy(),
    )  # fmt: skip
    return alias_view(move)


@router.delete("/registry/models/{name}/aliases/{alias}", response_model=AliasObject)
def delete_alias(
    ctx: CtxDep, principal: PrincipalDep, name: NamePath, alias: AliasPath
) -> AliasObject:
    registry = _alias_registry(ctx, principal, name)
    move = promotions.delete_alias(
        ctx.sessions, registry, actor=principal, name=name, alias=alias,
        on_moved=ctx.on_alias_moved,
    )  # fmt: skip
    return alias_view(move)


@router.post("/registry/models/{name}/aliases/{alias}/rollback", response_model=AliasObject)
def rollback(
    ctx: CtxDep,
    principal: PrincipalDep,
    name: NamePath,
    alias: AliasPath,
    body: AliasAction | None = None,
    idempotency_key: IdempotencyKeyDep = None,
) -> JSONResponse:
    """A retried rollback with its Idempotency-Key replays the first answer instead of
    walking the alias back a second step."""
    registry = _alias_registry(ctx, principal, name)

    def action() -> tuple[int, dict[str, Any]]:
        move = promotions.rollback(
            ctx.sessions, registry, actor=principal, name=name, alias=alias,
            reason=body.reason if body else None, on_moved=ctx.on_alias_moved,
        )  # fmt: skip
        return 200, alias_view(move).model_dump(mode="json")

    status, view = run_idempotent_action(
        ctx.sessions, project_id=principal.project_id, key=idempotency_key, method="POST",
        path=f"/v1/registry/models/{name}/aliases/{alias}/rollback",
        request_fingerprint=fingerprint(body.model_dump(mode="json") if body else None),
        ttl_s=ctx.settings.idempotency_ttl_s, action=action,
    )  # fmt: skip
    return JSONResponse(view, status_code=status)


@router.get("/audit", response_model=ListResponse[AuditObject])
def list_audit(
    ctx: CtxDep,
    principal: PrincipalDep,
    target: Annotated[str | None, Query(max_length=600, pattern=r"^[^\x00]*$")] = None,
    after: AfterQuery = None,
    limit: LimitQuery = 20,
) -> ListResponse[AuditObject]:
    with ctx.sessions() as session:
        rows, more = promotions.list_audit(
            session, project_id=principal.project_id, target=target, after=after, limit=limit
        )
        data = [audit_view(r) for r in rows]
    return ListResponse[AuditObject].of(data, more)


def _alias_registry(ctx: CtxDep, principal: Principal, name: str) -> ScopedRegistry:
    """The project's registry, with ``name`` checked now: before the alias lock is taken.
    (Only admins get here: alias moves are ADMIN_ONLY, checked by KeyFirstRoute.)"""
    registry = ctx.registry_for(principal.project_id)
    registry.check(name)
    return registry


def _version_view(ctx: CtxDep, v: ModelVersionInfo) -> ModelVersionObject:
    return version_view(v, run_url=ctx.mlflow_run_url(v.run_id))
