"""Typed dependencies for routes: the app context, a principal, an idempotency key; and
``KeyFirstRoute``, the route class of every /v1 router (key and role before the body)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from thinkforge.platform.auth import Principal, authenticate, require_role
from thinkforge.platform.deployments import DeploymentManager
from thinkforge.platform.errors import Unavailable
from thinkforge.platform.launcher import JobLauncher
from thinkforge.platform.ownership import ScopedRegistry
from thinkforge.platform.promotions import EvalPolicy, OnMoved
from thinkforge.platform.reconciler import ProgressTracker
from thinkforge.platform.registry import ModelRegistry
from thinkforge.platform.serving import ServeClient
from thinkforge.platform.settings import Settings


@dataclass
class AppContext:
    """Everything one control-plane process holds; built by create_app, never a global."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    launcher: JobLauncher
    tracker: ProgressTracker | None = None
    registry_factory: Callable[[], ModelRegistry] | None = None
    serve: ServeClient | None = None
    _deployments: DeploymentManager | None = None
    alias_listeners: list[OnMoved] = field(default_factory=list)
    _registry: ModelRegistry | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)  # lazy parts

    def registry(self) -> ModelRegistry:
        with self._lock:
            if self._registry is None:
                if self.registry_factory is not None:
                    self._registry = self.registry_factory()
                else:
                    from thinkforge.platform.registry import MlflowRegistry

                    self._registry = MlflowRegistry(self.settings.mlflow_tracking_uri)
            return self._registry

    def registry_for(self, project_id: str) -> ScopedRegistry:
        """The registry as one project sees it (routes); one per request."""
        return ScopedRegistry(self.registry(), self.sessions, project_id)

    def promotion_policy(self) -> EvalPolicy | None:
        if not self.settings.promotion_requires_eval:
            return None
        return EvalPolicy(self.sessions, self.settings.promotion_min_accuracy)

    def deployments(self) -> DeploymentManager:
        if self.serve is None:
            raise Unavailable("serving is not configured: this control plane has no Ray Serve")
        with self._lock:  # one manager: its lock is what keeps applies in turn
            if self._deployments is None:
                self._deployments = DeploymentManager(
                    self.sessions, self.serve, self.registry(), self.settings
                )
            return self._deployments

    def on_alias_moved(self, name: str, alias: str, version: int | None) -> None:
        for listener in self.alias_listeners:
            listener(name, alias, version)
        if self.serve is not None:
            self.deployments().on_alias_moved(name, alias, version)

    def mlflow_run_url(self, run_id: str | None) -> str | None:
        uri = self.settings.mlflow_tracking_uri
        if not run_id or not uri.startswith(("http://", "https://")):
            return None
        return f"{uri.rstrip('/')}/#/runs/{run_id}"


def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


CtxDep = Annotated[AppContext, Depends(get_ctx)]


def _authenticate(ctx: AppContext, authorization: str | None) -> Principal:
    with ctx.sessions() as session:
        return authenticate(session, ctx.settings, authorization)


class KeyFirstRoute(APIRoute):
    """Checks the API key, and the role for ADMIN_ONLY actions, from the headers alone,
    before FastAPI reads the body: an upload without a key is refused at once, not after
    up to max_upload_bytes were spooled to disk. The principal is kept for get_principal.

        router = APIRouter(prefix="/v1/files", route_class=KeyFirstRoute)
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        path = self.path_format

        async def key_first(request: Request) -> Response:
            ctx = get_ctx(request)
            authorization = request.headers.get("authorization")
            principal = await run_in_threadpool(_authenticate, ctx, authorization)
            require_role(principal, request.method, path)
            request.state.principal = principal
            return await handler(request)

        return key_first


def get_principal(
    request: Request, ctx: CtxDep, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal if principal is not None else _authenticate(ctx, authorization)


PrincipalDep = Annotated[Principal, Depends(get_principal)]
IdempotencyKeyDep = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)
]
AfterQuery = Annotated[str | None, Query(max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
LimitQuery = Annotated[int, Query(ge=1, le=100)]
