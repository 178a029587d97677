"""Alembic migrations of the control-plane database.

upgrade(settings.database_url)        # what `thinkforge db upgrade` and server start run
"""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config

HERE = Path(__file__).parent
# Alembic's command API installs module-level proxies (alembic.context, alembic.op) while it
# runs: two apps starting in one process (threads) must migrate one after the other, and
# MLflow's own store migrations use the same proxies (ALEMBIC_LOCK guards both).
ALEMBIC_LOCK = threading.Lock()


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(HERE))
    # ConfigParser interpolation would eat '%' in passwords.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    with ALEMBIC_LOCK:
        command.upgrade(alembic_config(database_url), revision)


def current(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from thinkforge.platform.db import make_engine

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
