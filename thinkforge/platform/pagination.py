"""Cursor pagination over ``seq`` order, newest first: ``after`` is the last id of a page."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

from thinkforge.platform.errors import InvalidRequest

Row = TypeVar("Row")


def page(
    session: Session, stmt: Select[Any], model: Any, *, after: str | None, limit: int
) -> tuple[list[Any], bool]:
    """Return up to ``limit`` rows of ``stmt`` after the row with id ``after``, and has_more."""
    if after is not None:
        # Looked up through the list's own filters: another project's id is no cursor here.
        cursor = session.scalar(stmt.with_only_columns(model.seq).where(model.id == after))
        if cursor is None:
            raise InvalidRequest(f"cursor {after!r} is not an object of this list", param="after")
        stmt = stmt.where(model.seq < cursor)
    rows = list(session.scalars(stmt.order_by(model.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
