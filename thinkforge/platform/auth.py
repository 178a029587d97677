"""API keys: bearer tokens scoped to a project, stored as keyed HMAC digests.

key = create_key(session, secret, project_id="default", role="admin")   # shown once
principal = authenticate(session, settings, "Bearer tf-…")
revoke_key(session, project_id="default", key_id="key-…")              # stops at once here,
                                                                        # within 30 s on the door
Roles: ``admin`` (everything in its project), ``member`` (everything but admin actions),
``inference`` (the Serve front door only: for applications; the REST API answers 403).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Literal, get_args

from sqlalchemy import select
from sqlalchemy.orm import Session

from thinkforge.contract import key_digest as hash_key
from thinkforge.platform.errors import AuthenticationFailed, NotFound, PermissionDenied
from thinkforge.platform.models import DEFAULT_PROJECT, ApiKey, Project, new_id, utcnow
from thinkforge.platform.settings import Settings

KEY_PREFIX = "tf-"
BOOTSTRAP_KEY_ID = "key-bootstrap"
Role = Literal["admin", "member", "inference"]
ROLES: tuple[str, ...] = get_args(Role)

# The actions only an admin key may take, as (method, path template): the one list. Every
# other /v1 action is open to any key of the project (tests/platform/test_api_access.py
# walks /openapi.json against it).
ADMIN_ONLY: frozenset[tuple[str, str]] = frozenset(
    {
        ("PUT", "/v1/registry/models/{name}/aliases/{alias}"),
        ("DELETE", "/v1/registry/models/{name}/aliases/{alias}"),
        ("POST", "/v1/registry/models/{name}/aliases/{alias}/rollback"),
        ("GET", "/v1/keys"),
        ("POST", "/v1/keys/{key_id}/revoke"),
        ("PATCH", "/v1/quotas"),
    }
)


@dataclass(frozen=True)
class Principal:
    project_id: str
    key_id: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def require_role(principal: Principal, method: str, path: str) -> None:
    """403 unless ``principal`` may take the action ``method path`` (see ADMIN_ONLY)."""
    if (method, path) in ADMIN_ONLY and not principal.is_admin:
        raise PermissionDenied(
            f"{method} {path} needs an admin key (thinkforge keys create --admin)",
            code="admin_required",
        )


def ensure_project(session: Session, project_id: str) -> Project:
    project = session.get(Project, project_id)
    if project is None:
        project = Project(id=project_id)
        session.add(project)
        session.flush()
    return project


def create_key(
    session: Session,
    secret: str,
    *,
    project_id: str = DEFAULT_PROJECT,
    name: str = "",
    role: str = "member",
) -> str:
    """Create a key in ``project_id`` (created if missing); returns the plain key, shown once."""
    return create_key_row(session, secret, project_id=project_id, name=name, role=role)[1]


def create_key_row(
    session: Session, secret: str, *, project_id: str, name: str = "", role: str = "member"
) -> tuple[ApiKey, str]:
    """The new key's row (flushed) and its plain text."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    ensure_project(session, project_id)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id("key"),
        project_id=project_id,
        name=name,
        key_hash=hash_key(secret, key),
        prefix=key[:10],
        role=role,
    )
    session.add(row)
    session.flush()
    return row, key


def list_keys(session: Session, *, project_id: str) -> list[ApiKey]:
    return list(
        session.scalars(
            select(ApiKey).where(ApiKey.project_id == project_id).order_by(ApiKey.created_at)
        )
    )


def revoke_key(session: Session, *, project_id: str, key_id: str) -> ApiKey:
    """Revoke a key of ``project_id`` (idempotent: a revoked key keeps its first time)."""
    row = session.scalar(
        select(ApiKey).where(ApiKey.id == key_id, ApiKey.project_id == project_id).with_for_update()
    )
    if row is None:
        raise NotFound(f"no API key {key_id!r} in this project", param="key_id")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def refuse_inference_key(principal: Principal) -> Principal:
    """Inference keys only call the front door; the REST API answers them 403."""
    if principal.role == "inference":
        raise PermissionDenied(
            "an inference key only calls the Serve front door (/v1/chat/completions); "
            "use a member or admin key for the REST API",
            code="inference_key",
        )
    return principal


def derived_key(secret: str, purpose: str) -> str:
    """A key the control plane can compute again from its secret (never stored in plain):
    an evaluation job's key to the front door, handed to its run through the environment."""
    return KEY_PREFIX + hash_key(secret, f"thinkforge:derived:{purpose}")


def create_derived_key(
    session: Session, secret: str, *, project_id: str, key_id: str, purpose: str, role: str
) -> None:
    """Store the digest of ``derived_key(secret, purpose)`` as key ``key_id``."""
    key = derived_key(secret, purpose)
    row = ApiKey(
        id=key_id, project_id=project_id, name=purpose, key_hash=hash_key(secret, key),
        prefix=key[:10], role=role,
    )  # fmt: skip
    session.add(row)


def authenticate(session: Session, settings: Settings, authorization: str | None) -> Principal:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed(
            "missing API key: send 'Authorization: Bearer <key>' (create one with "
            "'thinkforge keys create')"
        )
    token = token.strip()
    bootstrap = settings.bootstrap_api_key
    if bootstrap is not None and hmac.compare_digest(
        token.encode(), bootstrap.get_secret_value().encode()
    ):
        return Principal(project_id=DEFAULT_PROJECT, key_id=BOOTSTRAP_KEY_ID, role="admin")
    digest = hash_key(settings.secret_key.get_secret_value(), token)
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    if row is None or row.revoked_at is not None:
        raise AuthenticationFailed("invalid API key: check the key, or create a new one")
    return Principal(project_id=row.project_id, key_id=row.id, role=row.role)
