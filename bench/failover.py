"""How long the reconciler is leaderless when its leader dies: two `thinkforge up` replicas on
one PostgreSQL database, the leader killed (SIGKILL) or stopped (SIGTERM) again and again,
the time until the survivor's /readyz says it leads, then the dead one started again.

    .venv/bin/python bench/failover.py --database-url postgresql://postgres@127.0.0.1:5432/test \
        --lease-s 10 --rounds 3

The database must be an empty one (or one thinkforge already migrated). No Ray is needed:
the replicas are pointed at an address where nothing answers, and there are no jobs.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Replica:
    def __init__(self, name: str, env: dict[str, str], data_dir: Path) -> None:
        self.name, self.env, self.data_dir = name, env, data_dir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        log = open(self.data_dir / f"{self.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "thinkforge.cli", "up", "--port", str(self.port)],
            env={**self.env, "THINKFORGE_REPLICA_ID": self.name}, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while self.reconciler() is None:
            assert time.monotonic() < deadline and self.proc.poll() is None, f"{self.name} down"
            time.sleep(0.2)
        return self

    def reconciler(self) -> dict[str, object] | None:
        try:
            resp = httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2)
        except httpx.TransportError:
            return None
        return dict(resp.json()["reconciler"]) if resp.status_code == 200 else None

    def leads(self) -> bool:
        state = self.reconciler()
        return bool(state and state["is_leader"])

    def end(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)


def takeover_s(dying: Replica, survivor: Replica, sig: int) -> float:
    dying.end(sig)
    start = time.monotonic()
    while not survivor.leads():
        assert time.monotonic() - start < 120, "no takeover"
        time.sleep(0.05)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--lease-s", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="tf-failover-"))
    env = {
        **os.environ,
        "THINKFORGE_DATA_DIR": str(data_dir),
        "THINKFORGE_DATABASE_URL": args.database_url,
        "THINKFORGE_RAY_ADDRESS": f"http://127.0.0.1:{free_port()}",  # nothing there: no jobs
        "THINKFORGE_LEADER_LEASE_S": str(args.lease_s),
    }
    replicas = [Replica(name, env, data_dir) for name in ("replica-a", "replica-b")]
    results: dict[str, list[float]] = {"SIGKILL": [], "SIGTERM": []}
    try:
        for replica in replicas:
            replica.start()
        for _ in range(args.rounds):
            for sig in (signal.SIGKILL, signal.SIGTERM):
                leader, other = replicas if replicas[0].leads() else replicas[::-1]
                results[sig.name].append(takeover_s(leader, other, sig))
                leader.start()
    finally:
        for replica in replicas:
            if replica.proc is not None and replica.proc.poll() is None:
                replica.end(signal.SIGTERM)
    print(f"lease {args.lease_s:g} s, {args.rounds} rounds (logs in {data_dir})")
    print("| leader ended by | takeover min s | median s | max s |")
    print("|---|---|---|---|")
    for name, times in results.items():
        print(f"| {name} | {min(times):.1f} | {statistics.median(times):.1f} | {max(times):.1f} |")


if __name__ == "__main__":
    main()
