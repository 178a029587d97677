"""/v1/registry: registered models and versions with lineage, as the key's project sees them
(another project's models look absent: see ``ownership``); aliases moved with checks."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse
from sqlalchemy import select

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
from thinkforge.platform.idempotency import fingerprint, run_idempotent_action
from thinkforge.platform.models import AuditEntry
from thinkforge.platform.ownership import ScopedRegistry
from thinkforge.platform.pagination import page
from thinkforge.platform.registry import ModelVersionDetail, ModelVersionInfo, all_versions
from thinkforge.platform.schemas import (
    AliasAction,
    AliasMoveCreate,
    AliasObject,
    AuditObject,
    ListResponse,
    ModelVersionObject,
    RegisteredModelObject,
)
from thinkforge.platform.views import ts

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
    data = [_model_view(m) for m in found.items]
    listing = ListResponse[RegisteredModelObject].of(data, found.next_page_token is not None)
    listing.last_id = found.next_page_token
    return listing


@router.get("/registry/models/{name}", response_model=RegisteredModelObject)
def get_model(ctx: CtxDep, principal: PrincipalDep, name: NamePath) -> RegisteredModelObject:
    return _model_view(ctx.registry_for(principal.project_id).get_model(name))


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
    return _version_view(ctx, registry.get_version(name, version))


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
    return _alias_view(move)


@router.delete("/registry/models/{name}/aliases/{alias}", response_model=AliasObject)
def delete_alias(
    ctx: CtxDep, principal: PrincipalDep, name: NamePath, alias: AliasPath
) -> AliasObject:
    registry = _alias_registry(ctx, principal, name)
    move = promotions.delete_alias(
        ctx.sessions, registry, actor=principal, name=name, alias=alias,
        on_moved=ctx.on_alias_moved,
    )  # fmt: skip
    return _alias_view(move)


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
        return 200, _alias_view(move).model_dump(mode="json")

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
        stmt = select(AuditEntry).where(AuditEntry.project_id == principal.project_id)
        if target is not None:
            stmt = stmt.where(AuditEntry.target == target)
        rows, more = page(session, stmt, AuditEntry, after=after, limit=limit)
        data = [
            AuditObject(
                id=r.id,
                created_at=int(r.created_at.timestamp()),
                actor=r.actor,
                action=r.action,
                target=r.target,
                from_value=r.from_value,
                to_value=r.to_value,
                reason=r.reason,
            )
            for r in rows
        ]
    return ListResponse[AuditObject].of(data, more)


def _model_view(model) -> RegisteredModelObject:  # type: ignore[no-untyped-def]
    return RegisteredModelObject(
        name=model.name, description=model.description or "", created_at=ts(model.created_at) or 0,
        updated_at=ts(model.updated_at), aliases=model.aliases, latest_version=model.latest_version,
        tags=model.tags,
    )  # fmt: skip


def _version_view(ctx: CtxDep, v: ModelVersionInfo) -> ModelVersionObject:
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
        view.mlflow_run_url = ctx.mlflow_run_url(v.run_id)
    return view


def _alias_view(move: promotions.AliasMove) -> AliasObject:
    return AliasObject(
        name=move.name, alias=move.alias, version=move.version,
        previous_version=move.previous, audit_id=move.audit_id,
    )  # fmt: skip


def _alias_registry(ctx: CtxDep, principal: Principal, name: str) -> ScopedRegistry:
    """The project's registry, with ``name`` checked now: before the alias lock is taken.
    (Only admins get here: alias moves are ADMIN_ONLY, checked by KeyFirstRoute.)"""
    registry = ctx.registry_for(principal.project_id)
    registry.check(name)
    return registry
