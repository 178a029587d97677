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
from thinkforge.platform.models import DEFAULT_PROJECT, ApiKey, Deployment
from thinkforge.platform.quotas import all_quotas, default_quota
from thinkforge.platform.schemas import FrontDoorDeployment, FrontDoorDirectory, FrontDoorKey
from thinkforge.platform.settings import Settings


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
    deployments = [
        FrontDoorDeployment(name=d.name, project_id=d.project_id, public=d.public)
        for d in session.scalars(select(Deployment).where(Deployment.status != "deleting"))
    ]
    return FrontDoorDirectory(
        keys=keys,
        quotas=all_quotas(session, settings),
        deployments=deployments,
        default_quota=default_quota(settings),
    )
