"""/v1/usage: tokens the front door answered; /v1/internal/*: the front door's own calls."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query

from thinkforge.platform import frontdoor, usage
from thinkforge.platform.deps import CtxDep, FrontDoorDep, KeyFirstRoute, PrincipalDep
from thinkforge.platform.errors import InvalidRequest
from thinkforge.platform.schemas import FrontDoorDirectory, UsageBatch, UsageReport

router = APIRouter(prefix="/v1", tags=["usage"], route_class=KeyFirstRoute)
# Not in the public schema: only the front door calls these, with its derived token.
internal = APIRouter(prefix="/v1/internal", include_in_schema=False)
# Up to datetime's last second (9999-12-31T23:59:59Z): beyond it fromtimestamp raises.
LAST_SECOND = 253402300799
Seconds = Annotated[int | None, Query(ge=0, le=LAST_SECOND, description="unix seconds")]


@router.get("/usage", response_model=UsageReport)
def get_usage(
    ctx: CtxDep,
    principal: PrincipalDep,
    start: Seconds = None,
    end: Seconds = None,
    group_by: usage.GroupBy = "deployment",
) -> UsageReport:
    """Sums over ``[start, end)``; by default the last 30 days."""
    end_s = int(time.time()) + 60 if end is None else end
    start_s = end_s - 30 * 86400 if start is None else start
    if start_s >= end_s:
        raise InvalidRequest("start must be before end", param="start")
    with ctx.sessions() as session:
        data = usage.summarize(
            session, project_id=principal.project_id, group_by=group_by,
            start=datetime.fromtimestamp(start_s, UTC), end=datetime.fromtimestamp(end_s, UTC),
        )  # fmt: skip
    return UsageReport(start=start_s, end=end_s, group_by=group_by, data=data)


@internal.get("/frontdoor", response_model=FrontDoorDirectory)
def frontdoor_directory(ctx: CtxDep, _: FrontDoorDep) -> FrontDoorDirectory:
    with ctx.sessions() as session:
        return frontdoor.directory(session, ctx.settings)


@internal.post("/usage")
def record_usage(ctx: CtxDep, _: FrontDoorDep, body: UsageBatch) -> dict[str, int]:
    with ctx.sessions.begin() as session:
        return {"recorded": usage.record_batch(session, body.records)}
