"""Typed dependencies for routes: the app context, a principal, an idempotency key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, Query, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from thinkforge.platform.auth import Principal, authenticate
from thinkforge.platform.launcher import JobLauncher
from thinkforge.platform.reconciler import ProgressTracker
from thinkforge.platform.settings import Settings


@dataclass
class AppContext:
    """Everything one control-plane process holds; built by create_app, never a global."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    launcher: JobLauncher
    tracker: ProgressTracker | None = None
    extras: dict[str, object] = field(default_factory=dict)


def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


CtxDep = Annotated[AppContext, Depends(get_ctx)]


def get_principal(ctx: CtxDep, authorization: Annotated[str | None, Header()] = None) -> Principal:
    with ctx.sessions() as session:
        return authenticate(session, ctx.settings, authorization)


PrincipalDep = Annotated[Principal, Depends(get_principal)]
IdempotencyKeyDep = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)
]
AfterQuery = Annotated[str | None, Query(max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
LimitQuery = Annotated[int, Query(ge=1, le=100)]
