"""The control plane's FastAPI application: ``create_app(settings)``, no import-time globals.

app = create_app(Settings(data_dir=tmp), launcher=FakeLauncher())
uvicorn.run(app)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from thinkforge.platform.auth import ensure_project
from thinkforge.platform.db import make_engine, make_sessionmaker
from thinkforge.platform.deps import AppContext
from thinkforge.platform.distill import reconcile_distills
from thinkforge.platform.errors import PlatformError, error_body
from thinkforge.platform.evals import reconcile_evals
from thinkforge.platform.health import Check, database_check, http_check, mlflow_check, run_checks
from thinkforge.platform.idempotency import purge_expired
from thinkforge.platform.launcher import JobLauncher
from thinkforge.platform.leader import (
    LeaderCollector,
    Leadership,
    fenced,
    leader_status,
    leadership_for,
)
from thinkforge.platform.metrics import ApiMetrics, MetricsMiddleware
from thinkforge.platform.middleware import BodyLimitMiddleware
from thinkforge.platform.migrations import ALEMBIC_LOCK, upgrade
from thinkforge.platform.models import DEFAULT_PROJECT
from thinkforge.platform.ray_cluster import (
    RAY_HEAD_FILE,
    LocalRayCluster,
    auth_headers,
    free_port,
)
from thinkforge.platform.reconciler import Reconciler, every
from thinkforge.platform.routes import (
    deployments,
    distill,
    evals,
    files,
    jobs,
    keys,
    registry,
    usage,
)
from thinkforge.platform.schemas import Health
from thinkforge.platform.serving import RayServeClient, ServeClient
from thinkforge.platform.settings import Settings
from thinkforge.platform.tracker import MirrorRefresher, RunTracker
from thinkforge.platform.trust import guard_registry

log = logging.getLogger(__name__)

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
}


def create_app(
    settings: Settings | None = None,
    *,
    launcher: JobLauncher | None = None,
    serve: ServeClient | None = None,
) -> FastAPI:
    """The API; without a ``launcher`` it drives Ray (and Ray Serve) itself."""
    settings = settings or Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    cluster = None
    runs_jobs = launcher is None  # jobs on Ray will open the MLflow store too
    if launcher is None:
        launcher, serve, cluster = ray_launcher_for(settings)
    leadership = leadership_for(settings, engine)
    ctx = AppContext(
        settings=settings,
        engine=engine,
        sessions=make_sessionmaker(engine),
        launcher=launcher,
        tracker=RunTracker(
            tracking_uri=settings.mlflow_tracking_uri,
            storage_path=settings.storage_path,
            files_dir=settings.files_dir,
        ),
        serve=serve,
    )
    checks: dict[str, Check] = {"database": database_check(engine)}
    if runs_jobs:
        checks["ray"] = cluster.check if cluster is not None else ray_check(settings)
    checks["mlflow"] = mlflow_check(settings.mlflow_tracking_uri)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if cluster is not None:
            cluster.start_in_background()  # Ray comes up while the database migrates
        writes = fenced(ctx.sessions, leadership)  # the loops write only while leading
        reconciler = Reconciler(
            writes,
            ctx.launcher,
            tracker=ctx.tracker,
            interval_s=settings.reconcile_interval_s,
            tasks=[
                lambda: reconcile_evals(writes, ctx.launcher, settings),
                lambda: reconcile_distills(writes, ctx.launcher, settings),
                MirrorRefresher(writes, ctx.registry),
                every(
                    settings.registry_guard_interval_s,
                    lambda: guard_registry(writes, ctx.registry()),
                ),
                every(
                    settings.idempotency_purge_interval_s,
                    lambda: purge_expired(writes, ttl_s=settings.idempotency_ttl_s),
                ),
                *(
                    [lambda: ctx.deployments().reconcile(sessions=writes)]
                    if serve is not None
                    else []
                ),
            ],
            leader=leadership,
        )
        try:  # a start that fails half-way (say, the database is down) leaves no Ray head
            if settings.migrate_on_start:
                upgrade(settings.database_url)
            if settings.start_reconciler:
                leadership.start()  # a second replica on one SQLite file stops here
            _init_mlflow_store(settings.mlflow_tracking_uri)
            with ctx.sessions.begin() as session:
                ensure_project(session, DEFAULT_PROJECT)
            if settings.start_reconciler:
                reconciler.start()
            app.state.ready = True
            yield
        finally:
            app.state.ready = False
            reconciler.stop()
            leadership.stop()
            if cluster is not None:
                cluster.stop()
            engine.dispose()

    development = settings.env == "development"
    app = FastAPI(
        title="thinkforge",
        version="0.1.0",
        description="Fine-tune reasoning models on Ray and serve them with budget forcing.",
        lifespan=lifespan,
        # The schema stays public (clients generate from it); the browsable pages, which
        # load scripts from a CDN, only in development.
        docs_url="/docs" if development else None,
        redoc_url="/redoc" if development else None,
    )
    app.state.ctx = ctx
    app.state.ready = False
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=settings.max_request_bytes,
        upload_limit=settings.max_upload_bytes + 64 * 1024,
        upload_paths=("/v1/files",),
    )
    metrics = ApiMetrics()
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: sees 413s too
    _install_error_handlers(app)
    app.include_router(_health_router(checks, leadership, metrics))
    app.include_router(files.router)
    app.include_router(jobs.router)
    app.include_router(registry.router)
    app.include_router(deployments.router)
    app.include_router(evals.router)
    app.include_router(distill.router)
    app.include_router(keys.router)
    app.include_router(usage.router)
    app.include_router(usage.internal)
    return app


def _init_mlflow_store(tracking_uri: str) -> None:
    """Open a database-backed MLflow store now, before the reconciler's threads and the jobs
    open it too: MLflow migrates a new store on first use with alembic, whose proxies are
    module globals (a second app in this process may be migrating), and two processes
    migrating one store at once collide."""
    if tracking_uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
        from mlflow.tracking import MlflowClient

        with ALEMBIC_LOCK:
            MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)


def ray_launcher_for(
    settings: Settings,
) -> tuple[JobLauncher, ServeClient, LocalRayCluster | None]:
    """Ray at ``settings.ray_address`` (a dashboard URL), or a local head owned by this app."""
    from thinkforge.platform.ray_launcher import RayJobLauncher

    token = settings.ray_auth_token.get_secret_value() if settings.ray_auth_token else None
    common: dict[str, Any] = {
        "mlflow_tracking_uri": settings.mlflow_tracking_uri,
        "mlflow_artifact_root": settings.mlflow_artifact_root,
        "storage_path": settings.storage_path,
        "data_dir": str(settings.data_dir),
        "autoscaling": settings.ray_autoscaling,
    }
    if settings.ray_address:
        serve = RayServeClient(settings.ray_address, token=token)
        return RayJobLauncher(settings.ray_address, token=token, **common), serve, None
    cluster = LocalRayCluster.in_data_dir(
        settings.data_dir / RAY_HEAD_FILE,
        num_cpus=settings.ray_num_cpus,
        dashboard_port=settings.ray_dashboard_port,
        gcs_port=free_port(),
        log_path=settings.data_dir / "ray-head.log",
        token=token,
    )
    launcher = RayJobLauncher(
        cluster.dashboard_url, token=cluster.token, wait_ready=cluster.wait_until_up, **common
    )
    serve = RayServeClient(
        cluster.dashboard_url, token=cluster.token, wait_ready=cluster.wait_until_up
    )
    return launcher, serve, cluster


def ray_check(settings: Settings) -> Check:
    token = settings.ray_auth_token.get_secret_value() if settings.ray_auth_token else None
    return http_check(f"{settings.ray_address.rstrip('/')}/api/version", auth_headers(token))


def _health_router(  # type: ignore[no-untyped-def]
    checks: dict[str, Check], leadership: Leadership, metrics: ApiMetrics
):
    from fastapi import APIRouter
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST

    router = APIRouter(tags=["health"])
    metrics.registry.register(LeaderCollector(leadership))

    @router.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(status="ok")

    @router.get("/readyz", response_model=Health)
    def readyz(request: Request) -> JSONResponse:
        """200 when every part answers; 503 naming the parts that do not."""
        results = run_checks(checks)
        down = [name for name, result in results.items() if result != "ok"]
        if not request.app.state.ready:
            status = "starting"
        else:
            status = f"unavailable: {', '.join(down)}" if down else "ok"
        body = Health(status=status, checks=results, reconciler=leader_status(leadership))
        return JSONResponse(body.model_dump(), status_code=200 if status == "ok" else 503)

    return router


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PlatformError)
    async def _platform_error(_: Request, exc: PlatformError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        message = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        return JSONResponse(
            error_body(message, "invalid_request_error", param, "invalid_value"), 400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _STATUS_TYPES.get(exc.status_code, "server_error")
        return JSONResponse(
            error_body(str(exc.detail), kind, None, None), exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(
            error_body("internal error; the server log has details", "server_error"), 500
        )
