"""Readiness: each outside part the control plane needs, asked cheaply and at once.

A check is a callable that returns when its part answers and raises ``Down`` (or any
error) when it does not; ``/readyz`` runs them side by side and names the parts that are
down. Messages are short and never carry a URI (the MLflow URI may hold credentials).

    checks = {"database": database_check(engine), "mlflow": mlflow_check(uri)}
    results = run_checks(checks)        # {"database": "ok", "mlflow": "error: ..."}
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

CHECK_TIMEOUT_S = 3.0
Check = Callable[[], None]


class Down(Exception):
    """The part did not answer as it should; ``str(exc)`` says how, briefly."""


def database_check(engine: Engine) -> Check:
    def check() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    return check


def mlflow_check(tracking_uri: str) -> Check:
    """An MLflow server answers its /health; a SQLite store opens; other stores are
    reached by the jobs' own client, so only their reachability by URL scheme is known."""
    if tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"

        def check_server() -> None:
            resp = httpx.get(url, timeout=CHECK_TIMEOUT_S)
            if resp.status_code != 200:
                raise Down(f"the tracking server answered {resp.status_code}")

        return check_server
    if tracking_uri.startswith("sqlite:"):
        database = make_url(tracking_uri).database or ""

        def check_sqlite() -> None:
            path = Path(database)
            if not path.exists():  # MLflow creates it on first use
                if not path.parent.is_dir():
                    raise Down("the store's folder is missing")
                return
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=CHECK_TIMEOUT_S) as db:
                db.execute("SELECT 1")

        return check_sqlite
    return lambda: None


def http_check(url: str, headers: dict[str, str] | None = None) -> Check:
    def check() -> None:
        resp = httpx.get(url, headers=headers, timeout=CHECK_TIMEOUT_S)
        if resp.status_code != 200:
            raise Down(f"answered {resp.status_code}")

    return check


def run_checks(checks: dict[str, Check]) -> dict[str, str]:
    """Every check at once; ``"ok"`` or ``"error: <why>"`` for each."""
    if not checks:
        return {}
    with ThreadPoolExecutor(max_workers=len(checks)) as pool:
        futures = {name: pool.submit(check) for name, check in checks.items()}
        return {name: _outcome(future.exception()) for name, future in futures.items()}


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, Down):
        return f"error: {exc}"
    if isinstance(exc, httpx.TransportError):
        return f"error: no answer ({type(exc).__name__})"
    return f"error: {type(exc).__name__}"
