"""Control-plane API benchmark: job create and list latency and throughput.

Runs the real API (uvicorn, in a subprocess, with a launcher that launches nothing so
only the API and database are measured) on SQLite and on PostgreSQL, and drives it with
1, 16 and 64 concurrent httpx clients. Prints p50/p99 latency and requests/s, and each
database's throughput as a ratio to SQLite at one client, all measured in this one run.

    .venv/bin/python bench/api_bench.py [--requests 300] [--skip-postgres]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

KEY = "tf-bench-" + secrets.token_hex(16)
PG_ADMIN = os.environ.get("THINKFORGE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
ROW = {"question": "Sum: 1 2", "thinking_trajectories": ["1+2=3"], "attempt": "Answer: 3"}


class NullLauncher:
    def submit(self, spec: object) -> None: ...

    def cancel(self, job_id: str) -> None: ...

    def status(self, job_id: str) -> object:
        from thinkforge.platform.launcher import LaunchState, LaunchStatus

        return LaunchStatus(LaunchState.PENDING)


def serve(port: int) -> None:
    import uvicorn

    from thinkforge.platform.app import create_app
    from thinkforge.platform.settings import Settings

    app = create_app(Settings(), launcher=NullLauncher())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(database_url: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "THINKFORGE_DATA_DIR": str(data_dir),
        "THINKFORGE_DATABASE_URL": database_url,
        "THINKFORGE_BOOTSTRAP_API_KEY": KEY,
        "THINKFORGE_START_RECONCILER": "false",
    }
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def measure(url: str, file_id: str, op: str, clients: int, total: int) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "thinkforge/tiny", "training_file": file_id}
    per_client = max(1, total // clients)

    def worker(_: int) -> list[float]:
        times = []
        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
            for _ in range(per_client):
                start = time.perf_counter()
                if op == "create":
                    resp = client.post("/v1/fine_tuning/jobs", json=body)
                else:
                    resp = client.get("/v1/fine_tuning/jobs", params={"limit": 20})
                resp.raise_for_status()
                times.append(time.perf_counter() - start)
        return times

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        latencies = sorted(t for ts in pool.map(worker, range(clients)) for t in ts)
    elapsed = time.perf_counter() - start
    return {
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "rps": len(latencies) / elapsed,
    }


def pg_database() -> tuple[str, object]:
    import sqlalchemy as sa

    name = f"thinkforge_bench_{secrets.token_hex(4)}"
    admin = sa.create_engine(
        PG_ADMIN.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}", drop


def run_backend(name: str, database_url: str, requests: int, levels: list[int]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(database_url, Path(tmp))
        try:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as c:
                data = (json.dumps(ROW) + "\n").encode()
                file_id = c.post(
                    "/v1/files", files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"}
                ).json()["id"]
            for op in ("create", "list"):
                for clients in levels:
                    result = measure(url, file_id, op, clients, requests)
                    rows.append({"db": name, "op": op, "clients": clients, **result})
                    print(
                        f"{name:9s} {op:6s} clients={clients:3d}  p50={result['p50_ms']:7.1f} ms  "
                        f"p99={result['p99_ms']:7.1f} ms  {result['rps']:7.1f} req/s",
                        flush=True,
                    )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=320, help="requests per measurement")
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    levels = [1, 16, 64]
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_backend("sqlite", f"sqlite:///{tmp}/bench.db", args.requests, levels)
    if not args.skip_postgres:
        url, drop = pg_database()
        try:
            rows += run_backend("postgres", url, args.requests, levels)
        finally:
            drop()  # type: ignore[operator]
    base = {r["op"]: r["rps"] for r in rows if r["db"] == "sqlite" and r["clients"] == 1}
    print("\nthroughput relative to SQLite with 1 client (same run):")
    for r in rows:
        print(
            f"  {r['db']:9s} {r['op']:6s} clients={r['clients']:3d}  x{r['rps'] / base[r['op']]:.2f}"
        )


if __name__ == "__main__":
    main()
