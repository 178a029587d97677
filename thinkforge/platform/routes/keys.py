"""/v1/keys and /v1/quotas: a project's API keys and front-door limits (admin keys)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from thinkforge.platform import auth, quotas
from thinkforge.platform.deps import CtxDep, KeyFirstRoute, PrincipalDep
from thinkforge.platform.schemas import KeyObject, ListResponse, QuotaObject, QuotaUpdate
from thinkforge.platform.views import key_view

router = APIRouter(prefix="/v1", tags=["keys"], route_class=KeyFirstRoute)  # admins: ADMIN_ONLY
KeyId = Annotated[str, Path(max_length=40, pattern=r"^key-[0-9a-f]+$")]


@router.get("/keys", response_model=ListResponse[KeyObject])
def list_keys(ctx: CtxDep, principal: PrincipalDep) -> ListResponse[KeyObject]:
    with ctx.sessions() as session:
        rows = auth.list_keys(session, project_id=principal.project_id)
        return ListResponse[KeyObject].of([key_view(r) for r in rows], False)


@router.post("/keys/{key_id}/revoke", response_model=KeyObject)
def revoke(ctx: CtxDep, principal: PrincipalDep, key_id: KeyId) -> KeyObject:
    with ctx.sessions.begin() as session:
        return key_view(auth.revoke_key(session, project_id=principal.project_id, key_id=key_id))


@router.get("/quotas", response_model=QuotaObject)
def get_quota(ctx: CtxDep, principal: PrincipalDep) -> QuotaObject:
    with ctx.sessions() as session:
        return quotas.get_quota(session, ctx.settings, project_id=principal.project_id)


@router.patch("/quotas", response_model=QuotaObject)
def set_quota(ctx: CtxDep, principal: PrincipalDep, body: QuotaUpdate) -> QuotaObject:
    with ctx.sessions.begin() as session:
        return quotas.set_quota(
            session, ctx.settings, project_id=principal.project_id,
            requests_per_minute=body.requests_per_minute,
            tokens_per_minute=body.tokens_per_minute,
        )  # fmt: skip
