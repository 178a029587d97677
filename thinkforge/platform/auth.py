"""API keys: bearer tokens scoped to a project, stored as keyed HMAC digests.

key = create_key(session, secret, project_id="default", role="admin")   # shown once
principal = authenticate(session, settings, "Bearer tf-…")
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from thinkforge.platform.errors import AuthenticationFailed, PermissionDenied
from thinkforge.platform.models import DEFAULT_PROJECT, ApiKey, Project, new_id
from thinkforge.platform.settings import Settings

KEY_PREFIX = "tf-"
BOOTSTRAP_KEY_ID = "key-bootstrap"

# The actions only an admin key may take, as (method, path template): the one list. Every
# other /v1 action is open to any key of the project (tests/platform/test_api_access.py
# walks /openapi.json against it).
ADMIN_ONLY: frozenset[tuple[str, str]] = frozenset(
    {
        ("PUT", "/v1/registry/models/{name}/aliases/{alias}"),
        ("DELETE", "/v1/registry/models/{name}/aliases/{alias}"),
        ("POST", "/v1/registry/models/{name}/aliases/{alias}/rollback"),
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


def hash_key(secret: str, key: str) -> str:
    return hmac.new(secret.encode(), key.encode(), hashlib.sha256).hexdigest()


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
    ensure_project(session, project_id)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            id=new_id("key"),
            project_id=project_id,
            name=name,
            key_hash=hash_key(secret, key),
            prefix=key[:10],
            role=role,
        )
    )
    return key


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
