"""Front-door quotas per project: requests and tokens per minute for each of its keys.

The front door enforces them (``thinkforge.serve.quotas``); this module keeps the numbers.

    get_quota(session, settings, project_id="default")
    set_quota(session, settings, project_id="default", requests_per_minute=60)
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from thinkforge.platform.auth import ensure_project
from thinkforge.platform.models import Project
from thinkforge.platform.schemas import QuotaObject
from thinkforge.platform.settings import Settings


def default_quota(settings: Settings) -> QuotaObject:
    return QuotaObject(
        requests_per_minute=settings.default_requests_per_minute,
        tokens_per_minute=settings.default_tokens_per_minute,
        default=True,
    )


def quota_of(project: Project, settings: Settings) -> QuotaObject:
    rpm, tpm = project.requests_per_minute, project.tokens_per_minute
    return QuotaObject(
        requests_per_minute=rpm or settings.default_requests_per_minute,
        tokens_per_minute=tpm or settings.default_tokens_per_minute,
        default=rpm is None and tpm is None,
    )


def get_quota(session: Session, settings: Settings, *, project_id: str) -> QuotaObject:
    project = session.get(Project, project_id)
    return default_quota(settings) if project is None else quota_of(project, settings)


def set_quota(
    session: Session, settings: Settings, *, project_id: str,
    requests_per_minute: int | None, tokens_per_minute: int | None,
) -> QuotaObject:  # fmt: skip
    """Set the given limits (None leaves one as it is)."""
    ensure_project(session, project_id)
    project = session.scalar(select(Project).where(Project.id == project_id).with_for_update())
    assert project is not None
    if requests_per_minute is not None:
        project.requests_per_minute = requests_per_minute
    if tokens_per_minute is not None:
        project.tokens_per_minute = tokens_per_minute
    return quota_of(project, settings)


def all_quotas(session: Session, settings: Settings) -> dict[str, QuotaObject]:
    return {p.id: quota_of(p, settings) for p in session.scalars(select(Project))}
