"""What several routers do the same way."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from thinkforge.platform.deps import AppContext
from thinkforge.platform.idempotency import fingerprint, run_idempotent

log = logging.getLogger(__name__)


def cancel_run(
    ctx: AppContext,
    *,
    project_id: str,
    run_id: str,
    path: str,
    idempotency_key: str | None,
    cancel: Callable[[Session], tuple[Any, bool]],
    view: Callable[[Any], BaseModel],
    submission: Callable[[Any], str] | None = None,
) -> JSONResponse:
    """``POST .../cancel`` of a job or an evaluation (its Ray job has the same id): the
    row changes in one idempotent transaction (``cancel`` returns the row and whether a
    launched run must be stopped), then Ray is asked to stop the run; if that fails the
    row stays cancelling and the reconciler asks again on each pass. ``submission`` names
    the row's Ray job when that is not ``run_id`` (a resumed fine-tune job's)."""
    must_stop = False
    stop_id = run_id

    def handler(session: Session) -> tuple[int, dict[str, Any]]:
        nonlocal must_stop, stop_id
        row, must_stop = cancel(session)
        stop_id = submission(row) if submission is not None else run_id
        return 200, view(row).model_dump(mode="json")

    status, body = run_idempotent(
        ctx.sessions, project_id=project_id, key=idempotency_key, method="POST", path=path,
        request_fingerprint=fingerprint(run_id), ttl_s=ctx.settings.idempotency_ttl_s,
        handler=handler,
    )  # fmt: skip
    if must_stop:
        try:
            ctx.launcher.cancel(stop_id)
        except Exception:
            log.exception("%s: stopping the run failed; the reconciler retries", run_id)
    return JSONResponse(body, status_code=status)
