"""What the Serve front door needs from the system of record, in one pull.

The front door has no database (``serve`` never imports ``platform``): every few seconds it
pulls this directory (key digests, quotas, deployments and who owns them) from
``GET /v1/internal/frontdoor``, and it keeps serving on the last one it got while the
control plane is away. A revoked key leaves the next pull.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from thinkforge.platform.auth import BOOTSTRAP_KEY_ID, hash_key
from thinkforge.platform.deployments import app_name
from thinkforge.platform.models import DEFAULT_PROJECT, ApiKey, Deployment
from thinkforge.platform.quotas import all_quotas, default_quota
from thinkforge.platform.schemas import FrontDoorDeployment, FrontDoorDirectory, FrontDoorKey
from thinkforge.platform.settings import Settings
from thinkforge.serve.config import ModelServeConfig

DEFAULT_TIMEOUT_S = ModelServeConfig.model_fields["request_timeout_s"].default


def directory(session: Session, settings: Settings) -> FrontDoorDirectory:
    keys = [
        FrontDoorKey(digest=k.key_hash, key_id=k.id, project_id=k.project_id, role=k.role)
        for k in session.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None)))
    ]
    if settings.bootstrap_api_key is not None:
        secret = settings.secret_key.get_secret_value()
        digest = hash_key(secret, settings.bootstrap_api_key.get_secret_value())
        keys.append(
            FrontDoorKey(
                digest=digest, key_id=BOOTSTRAP_KEY_ID, project_id=DEFAULT_PROJECT, role="admin"
            )
        )
    rows = session.scalars(select(Deployment).where(Deployment.status != "deleting"))
    deployments = [_deployment(d) for d in rows]
    return FrontDoorDirectory(
        keys=keys,
        quotas=all_quotas(session, settings),
        deployments=deployments,
        default_quota=default_quota(settings),
    )


def _deployment(row: Deployment) -> FrontDoorDeployment:
    timeout_s = float(row.config.get("request_timeout_s", DEFAULT_TIMEOUT_S))
    return FrontDoorDeployment(
        name=row.name, project_id=row.project_id, public=row.public, app=app_name(row.name),
        timeout_s=timeout_s,
    )  # fmt: skip
