"""Usage: what the front door answered, per project, key, deployment, version and minute.

The front door sums requests in memory and sends a batch every few seconds
(``POST /v1/internal/usage``); one batch is one insert, never one write per request.

    record_batch(session, records)
    summarize(session, project_id="default", start=t0, end=t1, group_by="deployment")
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from thinkforge.platform.models import Project, UsageRecord
from thinkforge.platform.schemas import UsageBucket, UsageIn

GroupBy = Literal["deployment", "key", "day"]


def record_batch(session: Session, records: list[UsageIn]) -> int:
    """Insert one batch; records of unknown projects (deleted since) are dropped."""
    projects = {r.project_id for r in records}
    known = set(session.scalars(select(Project.id).where(Project.id.in_(projects))))
    rows = [
        {
            **r.model_dump(exclude={"minute"}),
            "minute": datetime.fromtimestamp(r.minute - r.minute % 60, UTC),
        }
        for r in records
        if r.project_id in known
    ]
    if rows:
        session.execute(insert(UsageRecord), rows)
    return len(rows)


def summarize(
    session: Session, *, project_id: str, start: datetime, end: datetime, group_by: GroupBy
) -> list[UsageBucket]:
    """Sums over ``[start, end)``, one bucket per group, largest first for deployment/key."""
    group: Any = {
        "deployment": UsageRecord.deployment,
        "key": UsageRecord.key_id,
        "day": func.date(UsageRecord.minute),  # SQLite and PostgreSQL both have date()
    }[group_by]
    sums = (
        func.sum(UsageRecord.requests),
        func.sum(UsageRecord.prompt_tokens),
        func.sum(UsageRecord.completion_tokens),
        func.sum(UsageRecord.reasoning_tokens),
    )
    query = (
        select(group, *sums)
        .where(
            UsageRecord.project_id == project_id,
            UsageRecord.minute >= start,
            UsageRecord.minute < end,
        )
        .group_by(group)
        .order_by(group)
    )
    buckets = [_bucket(str(g), *(int(v or 0) for v in rest)) for g, *rest in session.execute(query)]
    if group_by != "day":
        buckets.sort(key=lambda b: -b.total_tokens)
    return buckets


def _bucket(group: str, requests: int, prompt: int, completion: int, reasoning: int) -> UsageBucket:
    return UsageBucket(
        group=group, requests=requests, prompt_tokens=prompt, completion_tokens=completion,
        reasoning_tokens=reasoning, total_tokens=prompt + completion,
    )  # fmt: skip
