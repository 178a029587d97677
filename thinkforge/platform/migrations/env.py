"""Alembic environment: runs migrations on the engine thinkforge itself would use."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from thinkforge.platform.db import make_engine
from thinkforge.platform.models import Base

target_metadata = Base.metadata
LOCK = 0x7468696E6B  # "think": one migration at a time across control-plane replicas


def run() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url, "sqlalchemy.url is not set"
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":  # replicas starting together
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK})
                context.run_migrations()
    finally:
        engine.dispose()


run()
