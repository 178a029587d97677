"""Deployments: the desired serving state, kept in the database and applied to Ray Serve.

A deployment serves one registry model (``name@alias`` or ``name/version``) under its
own name, which is the ``model`` that OpenAI clients send. Each is a Serve application
of its own (``model-<name>``), behind one front door (``thinkforge``), so changing one
deployment rolls only that one. An alias is resolved to its version here, so a
promotion changes the application's args and Serve rolls it (new replicas verify the
manifest and load before the old ones go; ``max_surge_percent`` keeps the old serving).

    row = create_deployment(session, project_id=..., spec=DeploymentCreate(...), registry=r)
    apply(sessions, serve, registry, settings)      # the whole desired config, every time
    sync_statuses(sessions, serve)                  # Serve's view back into the rows
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from thinkforge.contract import LORA_TAG
from thinkforge.platform.errors import Conflict, InvalidRequest, NotFound, first_error_location
from thinkforge.platform.models import Deployment, new_id, utcnow
from thinkforge.platform.registry import ModelRegistry, parse_ref
from thinkforge.platform.serving import ServeClient
from thinkforge.platform.settings import Settings
from thinkforge.platform.status import DeploymentStatus, moves
from thinkforge.platform.trust import intended_alias, stored_pin
from thinkforge.serve.config import LORA_ENGINE_HELP, ModelServeConfig

log = logging.getLogger(__name__)
FRONT_DOOR = "thinkforge"
SERVE_OPTIONS = (
    "engine", "template", "device", "dtype", "num_gpus", "autoscaling", "max_ongoing_requests",
    "max_queued_requests", "request_timeout_s", "max_batch_size", "max_completion_tokens",
    "default_thinking", "reasoning_effort", "engine_args", "adapters",
)  # fmt: skip


def app_name(deployment: str) -> str:
    return f"model-{deployment}"


def validate_options(name: str, model: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check a deployment's serving options with the serve side's own model."""
    try:
        parse_ref(model)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, param="model") from None
    try:
        cfg = ModelServeConfig.model_validate({"name": name, "model_path": model, **options})
    except ValidationError as exc:
        loc, msg = first_error_location(exc)
        raise InvalidRequest(f"{loc}: {msg}", param=loc or None) from None
    return cfg.model_dump(mode="json", include=set(options))


def create_deployment(
    session: Session, registry: ModelRegistry, *, project_id: str, name: str, model: str,
    options: dict[str, Any], public: bool = False,
) -> Deployment:  # fmt: skip
    clean = validate_options(name, model, options)
    registry.resolve(model)  # 404 now, not a failed rollout later; before the first read
    check_lora(registry, model, clean)
    if session.scalar(select(Deployment.id).where(Deployment.name == name)) is not None:
        raise name_taken(name)
    row = Deployment(
        id=new_id("deploy"), project_id=project_id, name=name, model=model,
        engine=str(clean.get("engine", "transformers")), config=clean,
        status=DeploymentStatus.PENDING.value, public=public,
    )  # fmt: skip
    session.add(row)
    try:
        session.flush()
    except IntegrityError:  # another request took the name since the check above
        raise name_taken(name) from None
    return row


def check_lora(registry: ModelRegistry, model: str, options: dict[str, Any]) -> None:
    """Every ``adapters`` entry is a LoRA adapter version; the vllm engine serves none
    (``LORA_ENGINE_HELP``). Whether the adapters share the model's base is checked by the
    replica, which reads it from the adapters' files."""
    adapters = options.get("adapters") or {}
    for key, ref in adapters.items():
        param = f"adapters.{key}"
        try:
            reg_name, version = registry.resolve(ref)
        except (InvalidRequest, NotFound) as exc:
            raise type(exc)(exc.message, param=param) from None
        if registry.get_version(reg_name, version).tags.get(LORA_TAG) != "adapter":
            raise InvalidRequest(
                f"{param}: {reg_name}/{version} is not a LoRA adapter version (a job with "
                "method.supervised.lora and merge: false registers one)",
                param=param,
            )
    if options.get("engine") == "vllm":
        reg_name, version = registry.resolve(model)
        if registry.get_version(reg_name, version).tags.get(LORA_TAG) == "adapter":
            raise InvalidRequest(f"model {model}: {LORA_ENGINE_HELP}", param="engine")


def _pinned(session: Session, registry: ModelRegistry, adapters: dict[str, str]) -> dict[str, str]:
    """Adapter references pinned to versions, as the model's own is: a promotion rolls."""
    pinned = {}
    for key, ref in adapters.items():
        try:
            reg_name, version = _resolve(session, registry, ref)
            pinned[key] = f"models:/{reg_name}/{version}"
        except Exception as exc:  # the replica resolves it then (and fails if it must)
            log.warning("adapter %s: %s not pinned: %s", key, ref, exc)
            pinned[key] = ref
    return pinned


def name_taken(name: str) -> Conflict:
    """Names are unique across projects: a name is the ``model`` sent to the one front door."""
    return Conflict(f"a deployment named {name!r} exists; pick another name", param="name")


def get_deployment(session: Session, *, project_id: str, name: str) -> Deployment:
    row = session.scalar(
        select(Deployment).where(Deployment.name == name, Deployment.project_id == project_id)
    )
    if row is None:
        raise NotFound(f"no deployment {name!r} in this project", param="name")
    return row


def update_deployment(
    session: Session, registry: ModelRegistry, *, project_id: str, name: str,
    model: str | None, options: dict[str, Any], public: bool | None = None,
) -> Deployment:  # fmt: skip
    if model is not None:
        # Before the first read: a project-scoped registry reads in a session of its own.
        registry.resolve(model)
    row = get_deployment(session, project_id=project_id, name=name)
    if row.status == DeploymentStatus.DELETING:
        raise Conflict(f"deployment {name!r} is being deleted", param="name")
    merged = {**row.config, **options}
    new_model = model or row.model
    row.config = validate_options(name, new_model, merged)
    check_lora(registry, new_model, row.config)
    if model is not None:
        row.model = model
    row.engine = str(row.config.get("engine", row.engine))
    if public is not None:
        row.public = public
    set_status(row, DeploymentStatus.UPDATING, message=row.message)
    return row


def delete_deployment(session: Session, *, project_id: str, name: str) -> Deployment:
    """Mark for deletion: gone from the front door first, then from Serve (``sync_statuses``
    drops the row once every front door has pulled a directory without it)."""
    row = get_deployment(session, project_id=project_id, name=name)
    set_status(row, DeploymentStatus.DELETING, message=row.message)
    return row


def list_deployments(session: Session, *, project_id: str) -> list[Deployment]:
    """A project's deployments, newest first."""
    stmt = select(Deployment).where(Deployment.project_id == project_id)
    return list(session.scalars(stmt.order_by(Deployment.seq.desc())))


def set_status(row: Deployment, target: DeploymentStatus, *, message: str | None) -> bool:
    """Move ``row`` to ``target`` with ``message`` if the status machine allows it; returns
    whether the status changed (the message is refreshed when it stays)."""
    current = DeploymentStatus(row.status)
    moved = moves(current, target, what=f"deployment {row.name}")
    if moved or current == target:
        row.status, row.message = target.value, message
    return moved


Verify = Callable[[Session, str, int], list[str]]


def desired_config(
    session: Session, registry: ModelRegistry, settings: Settings, verify: Verify | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The whole Serve config, and for each deployment the ``name/version`` it should serve.
    With ``verify``, a deployment rolls to a new version only if its files pass."""
    rows = list(session.scalars(select(Deployment).order_by(Deployment.seq)))
    apps: list[dict[str, Any]] = []
    versions: dict[str, str] = {}
    for row in rows:
        target = _target(session, registry, row, verify)
        if target is None:
            continue
        reg_name, version = target
        versions[row.name] = f"{reg_name}/{version}"
        model = {
            "name": row.name, "model_uri": f"models:/{reg_name}/{version}",
            **row.config, "num_cpus": settings.serve_replica_cpus,
        }  # fmt: skip
        if row.config.get("adapters"):
            model["adapters"] = _pinned(session, registry, row.config["adapters"])
        apps.append(
            _app(
                app_name(row.name),
                None,
                {"models": [model], "ingress": {"enabled": False}},
                settings,
            )
        )
    # The door's arguments name no deployment: it routes the deployments of the directory
    # it pulls (thinkforge.platform.frontdoor), so adding or deleting one never rolls it.
    apps.insert(0, _app(FRONT_DOOR, "/", front_door_args(settings), settings))
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": settings.serve_host, "port": settings.serve_port},
        "applications": apps,
    }
    return config, versions


def front_door_args(settings: Settings) -> dict[str, Any]:
    access = {
        "url": settings.internal_api_url,
        "secret": settings.secret_key.get_secret_value(),
        "refresh_s": settings.frontdoor_refresh_s,
        "redis_url": settings.redis_url,
    }
    return {
        "ingress": {"num_cpus": 0, "graceful_shutdown_timeout_s": settings.serve_drain_s},
        "access": access,
    }


def _target(
    session: Session, registry: ModelRegistry, row: Deployment, verify: Verify | None
) -> tuple[str, int] | None:
    """The version ``row`` should serve: its reference resolved (an alias where thinkforge
    put it), else, when that fails or its files do not verify, the version it serves now."""
    try:
        reg_name, version = _resolve(session, registry, row.model)
        problems = []
        if verify is not None and f"{reg_name}/{version}" != row.served_version:
            problems = verify(session, reg_name, version)
        if problems:
            raise ValueError(f"{reg_name}/{version} failed its integrity check: {problems[:3]}")
        return reg_name, version
    except Exception as exc:  # an alias deleted under a deployment, bad files: keep what runs
        log.warning("deployment %s: not rolling to %s: %s", row.name, row.model, exc)
    if not row.served_version:
        return None
    reg_name, _, raw = row.served_version.partition("/")
    return reg_name, int(raw)


def _resolve(session: Session, registry: ModelRegistry, ref: str) -> tuple[str, int]:
    """An alias that thinkforge moved resolves to where the database says it put it:
    MLflow's copy may have been moved around the API (``thinkforge.platform.trust``)."""
    parsed = parse_ref(ref)
    if parsed.alias is not None:
        known, version = intended_alias(session, parsed.name, parsed.alias)
        if known and version is None:
            raise NotFound(f"{ref}: the alias was deleted", param="model")
        if known and version is not None:
            return parsed.name, version
    return registry.resolve(ref)


def _app(name: str, prefix: str | None, args: dict[str, Any], settings: Settings) -> dict[str, Any]:
    full = {
        **args,
        "mlflow_tracking_uri": settings.mlflow_tracking_uri,
        "model_cache_dir": str(settings.data_dir / "serve-cache"),
    }
    return {
        "name": name,
        "route_prefix": prefix,
        "import_path": "thinkforge.serve.app:build_app",
        "args": full,
    }


def apply(
    sessions: sessionmaker[Session], serve: ServeClient, registry: ModelRegistry, settings: Settings
) -> dict[str, str]:
    """Send the desired config to Serve; returns deployment -> version it should serve."""
    with sessions() as session:
        config, versions = desired_config(session, registry, settings)
    serve.apply(config)
    return versions


def sync_statuses(
    sessions: sessionmaker[Session], serve: ServeClient, wanted: dict[str, str],
    *, door_refresh_s: float,
) -> None:  # fmt: skip
    """Copy Serve's view into the rows: running, deploying, degraded (old version serving)."""
    statuses = serve.statuses()
    with sessions.begin() as session:
        for row in session.scalars(select(Deployment)):
            app = statuses.get(app_name(row.name))
            target = wanted.get(row.name)
            if row.status == DeploymentStatus.DELETING:
                # Out of the door's directory since it was marked; once every door has
                # pulled again, nothing routes here and Serve may drop it.
                if utcnow() - row.updated_at > timedelta(seconds=2 * door_refresh_s):
                    session.delete(row)
                continue
            if app is None:
                set_status(row, DeploymentStatus.DEPLOYING, message="waiting for Ray Serve")
                continue
            served = _served_version(app)
            if app.status == "RUNNING" and served == target:
                set_status(row, DeploymentStatus.RUNNING, message=None)
                row.served_version = served
            elif app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                failed = (
                    DeploymentStatus.DEGRADED if row.served_version else DeploymentStatus.FAILED
                )
                message = app.message[:2000] or "the new replicas did not become healthy"
                set_status(row, failed, message=message)
            else:
                set_status(row, DeploymentStatus.DEPLOYING, message=app.message[:2000] or None)


def _served_version(app: Any) -> str | None:
    models = app.args.get("models") or []
    uri = str(models[0].get("model_uri", "")) if models else ""
    return uri.removeprefix("models:/") or None


class DeploymentManager:
    """Keeps Ray Serve in line with the deployments table; the reconciler calls ``reconcile``.

    The config is re-sent only when it changed (or after a restart), so a steady state
    costs one status read per pass.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        serve: ServeClient,
        registry: ModelRegistry,
        settings: Settings,
    ) -> None:
        self.sessions = sessions
        self.serve = serve
        self.registry = registry
        self.settings = settings
        self._applied: str | None = None
        self._wanted: dict[str, str] = {}
        self._checked: dict[tuple[str, int, str | None], tuple[float, list[str]]] = {}
        self._lock = threading.Lock()

    def reconcile(
        self, *, force: bool = False, sessions: sessionmaker[Session] | None = None
    ) -> None:
        """``sessions``: the reconciler leader's fenced ones (platform/leader.py)."""
        sessions = sessions or self.sessions
        with self._lock:
            for _ in range(2):  # a finished deletion changes the config once more
                with sessions() as session:
                    if not force and self._applied is None and not _any(session):
                        return  # nothing was ever deployed: leave Serve unstarted
                    config, wanted = desired_config(
                        session, self.registry, self.settings, self._verify
                    )
                digest = json.dumps(config, sort_keys=True)
                if force or digest != self._applied:
                    self.serve.apply(config)
                    self._applied, self._wanted = digest, wanted
                sync_statuses(
                    sessions, self.serve, self._wanted,
                    door_refresh_s=self.settings.frontdoor_refresh_s,
                )  # fmt: skip

    def _verify(self, session: Session, name: str, version: int) -> list[str]:
        """The version's files against the database's pin; a pass is remembered, a failure
        is looked at again after a minute (someone may repair the files)."""
        pin = stored_pin(session, name, version)
        key = (name, version, pin)
        checked = self._checked.get(key)
        if checked is None or (checked[1] and time.monotonic() - checked[0] > 60):
            problems = self.registry.verify_version(name, version, manifest_sha256=pin)
            checked = self._checked[key] = (time.monotonic(), problems)
        return checked[1]

    def on_alias_moved(self, name: str, alias: str, version: int | None) -> None:
        """A promotion: deployments following ``name@alias`` roll now, not at the next pass."""
        self.reconcile()


def _any(session: Session) -> bool:
    return session.scalar(select(Deployment.seq).limit(1)) is not None
