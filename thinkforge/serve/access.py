"""Who may call the front door, and what: keys checked in the ingress against key digests.

The front door has no database. The control plane serves a directory (key digests,
quotas, deployments and their projects) at ``GET /v1/internal/frontdoor``; each ingress
replica pulls it every ``refresh_s`` (10 s: a revoked key stops within that, well inside
30 s) and keeps the last good one while the control plane is away.

    source = DirectorySource(AccessOptions(url="http://api:8000", secret="…"))
    caller = source.directory.caller(source.secret, token)      # None: unknown or revoked
    source.directory.visible(caller, "sums")                     # own project's, or public

A key is HMAC-SHA256(secret, key) hex, as the control plane stores it; the front door is
given the secret and shows the control plane a token derived from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from thinkforge.contract import frontdoor_token, key_digest

log = logging.getLogger(__name__)
INFERENCE_ROLES = frozenset({"admin", "member", "inference"})

__all__ = [
    "AccessOptions", "Caller", "Directory", "DirectorySource", "DirectoryUnavailable", "Quota",
    "key_digest",
]  # fmt: skip


class DirectoryUnavailable(Exception):
    """No directory was ever pulled: the control plane has not answered yet."""


class AccessOptions(BaseModel):
    """``build_app``'s ``access`` argument: where the directory is, and the key secret."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="the control plane, e.g. http://127.0.0.1:8000")
    secret: str = Field(min_length=1, description="THINKFORGE_SECRET_KEY")
    refresh_s: float = Field(default=10, gt=0, le=30)
    usage_flush_s: float = Field(default=5, gt=0, le=60)
    redis_url: str = Field(default="", description="shared quota counters; empty: per replica")


@dataclass(frozen=True)
class Caller:
    key_id: str
    project_id: str
    role: str


@dataclass(frozen=True)
class Quota:
    requests_per_minute: int
    tokens_per_minute: int


@dataclass(frozen=True)
class Owner:
    """A deployment: whose it is, and the Serve application that hosts it."""

    project_id: str
    public: bool
    app: str
    timeout_s: float


@dataclass
class Directory:
    keys: dict[str, Caller] = field(default_factory=dict)
    quotas: dict[str, Quota] = field(default_factory=dict)
    default_quota: Quota = Quota(600, 1_000_000)
    deployments: dict[str, Owner] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Directory:
        def quota(q: dict[str, Any]) -> Quota:
            return Quota(int(q["requests_per_minute"]), int(q["tokens_per_minute"]))

        return cls(
            keys={
                k["digest"]: Caller(k["key_id"], k["project_id"], k["role"])
                for k in data["keys"]
                if k["role"] in INFERENCE_ROLES
            },
            quotas={p: quota(q) for p, q in data["quotas"].items()},
            default_quota=quota(data["default_quota"]),
            deployments={
                d["name"]: Owner(d["project_id"], bool(d["public"]), d["app"], d["timeout_s"])
                for d in data["deployments"]
            },
        )

    def visible_models(self, caller: Caller) -> list[str]:
        return sorted(name for name in self.deployments if self.visible(caller, name))

    def caller(self, secret: str, token: str) -> Caller | None:
        return self.keys.get(key_digest(secret, token)) if token else None

    def quota(self, caller: Caller) -> Quota:
        return self.quotas.get(caller.project_id, self.default_quota)

    def visible(self, caller: Caller, model: str) -> bool:
        """A deployment the caller's project owns, or a public one. Models served without
        the control plane (not in the directory) are not visible to anyone."""
        owner = self.deployments.get(model)
        return owner is not None and (owner.public or owner.project_id == caller.project_id)


class DirectorySource:
    """Pulls the directory now and then; ``directory`` is the last good one."""

    def __init__(self, options: AccessOptions, *, http: httpx.AsyncClient | None = None) -> None:
        self.options = options
        self.secret = options.secret
        self.directory = Directory()
        self.loaded_at: float | None = None
        self.attempted_at = 0.0  # the last pull tried, good or not
        self.http = http or httpx.AsyncClient(
            base_url=options.url.rstrip("/"),
            headers={"Authorization": f"Bearer {frontdoor_token(options.secret)}"},
            timeout=10,
        )
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        resp = await self.http.get("/v1/internal/frontdoor")
        resp.raise_for_status()
        self.directory = Directory.from_json(resp.json())
        self.loaded_at = time.monotonic()

    async def current(self, max_age_s: float | None = None) -> Directory:
        """The directory, pulled first when it is older than ``max_age_s`` (default
        ``refresh_s``; one pull at a time, at most one a second; a failed pull keeps the
        last one and is logged). Raises DirectoryUnavailable until the first pull succeeds."""
        limit = self.options.refresh_s if max_age_s is None else max_age_s
        if self._stale(limit):
            async with self._lock:
                if self._stale(limit):
                    self.attempted_at = time.monotonic()
                    try:
                        await self.refresh()
                    except Exception as exc:
                        log.warning(
                            "front door: cannot pull keys from %s: %s", self.options.url, exc
                        )
                        if self.loaded_at is None:
                            raise DirectoryUnavailable(str(exc)) from None
        return self.directory

    def _stale(self, max_age_s: float) -> bool:
        if self.loaded_at is None:
            return True
        now = time.monotonic()
        return now - self.loaded_at > max_age_s and now - self.attempted_at >= min(1.0, max_age_s)
