"""Ray Serve behind a small Protocol: apply the whole desired config, read app statuses.

The control plane always sends the complete declarative config (Ray Serve's REST API,
``PUT /api/serve/applications/``), built from the deployments in the database, so Serve
is told what should run, never how to get there. Serve rolls only the applications
whose config changed.

    serve = RayServeClient("http://127.0.0.1:8265", token=...)
    serve.apply(config); serve.statuses()["model-sums"].status
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from thinkforge.platform.errors import Unavailable


@dataclass(frozen=True)
class AppStatus:
    status: str  # NOT_STARTED, DEPLOYING, RUNNING, DEPLOY_FAILED, UNHEALTHY, DELETING
    message: str
    deployment_statuses: dict[str, str]
    args: dict[str, Any]


class ServeClient(Protocol):
    def apply(self, config: dict[str, Any]) -> None: ...

    def statuses(self) -> dict[str, AppStatus]: ...


class RayServeClient:
    def __init__(
        self,
        dashboard_url: str,
        *,
        token: str | None = None,
        timeout_s: float = 60,
        wait_ready: Callable[[], None] | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=dashboard_url, headers=headers, timeout=timeout_s)
        self._wait_ready = wait_ready

    def apply(self, config: dict[str, Any]) -> None:
        if self._wait_ready is not None:
            self._wait_ready()
        try:
            resp = self.http.put("/api/serve/applications/", json=config)
        except httpx.HTTPError as exc:
            raise Unavailable(f"cannot reach Ray Serve at {self.http.base_url}: {exc}") from None
        if resp.status_code >= 400:
            raise Unavailable(
                f"Ray Serve refused the config ({resp.status_code}): {resp.text[:500]}"
            )

    def statuses(self) -> dict[str, AppStatus]:
        if self._wait_ready is not None:
            self._wait_ready()
        try:
            resp = self.http.get("/api/serve/applications/")
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            raise Unavailable(f"cannot read Ray Serve's status: {exc}") from None
        apps = resp.json().get("applications") or {}
        return {name: _app_status(app) for name, app in apps.items()}


def _app_status(app: dict[str, Any]) -> AppStatus:
    deployments = app.get("deployments") or {}
    config = app.get("deployed_app_config") or {}
    return AppStatus(
        status=str(app.get("status", "NOT_STARTED")),
        message=str(app.get("message") or ""),
        deployment_statuses={k: str(v.get("status")) for k, v in deployments.items()},
        args=dict(config.get("args") or {}),
    )
