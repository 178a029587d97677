"""Usage on the front door: sums per key, deployment, version and minute, sent in batches.

Answering a request adds to an in-memory sum (no I/O on the request path); every
``flush_s`` the sums go to the control plane in one ``POST /v1/internal/usage``, which
writes them in one insert. A failed send keeps the sums for the next one (bounded: past
``max_pending`` groups the oldest are dropped and logged).

    buffer = UsageBuffer(http)                     # http: the DirectorySource's client
    buffer.add(caller, "sums", "sums/3", prompt=12, completion=40, reasoning=30)
    await buffer.flush()                           # the ingress runs flush_forever()
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import httpx

from thinkforge.serve.access import Caller

log = logging.getLogger(__name__)

__all__ = ["UsageBuffer"]

Group = tuple[str, str, str, str | None, int]  # project, key, deployment, version, minute
FIELDS = ("requests", "prompt_tokens", "completion_tokens", "reasoning_tokens")


class UsageBuffer:
    def __init__(self, http: httpx.AsyncClient, *, max_pending: int = 50_000) -> None:
        self.http = http
        self.max_pending = max_pending
        self.pending: dict[Group, Counter[str]] = {}

    def add(
        self, caller: Caller, deployment: str, version: str | None, *,
        prompt: int, completion: int, reasoning: int,
    ) -> None:  # fmt: skip
        minute = int(time.time()) // 60 * 60
        group = (caller.project_id, caller.key_id, deployment, version, minute)
        sums = self.pending.setdefault(group, Counter())
        sums.update(
            requests=1, prompt_tokens=prompt, completion_tokens=completion,
            reasoning_tokens=reasoning,
        )  # fmt: skip
        if len(self.pending) > self.max_pending:
            oldest = next(iter(self.pending))
            log.error("usage not sent for too long: dropping %s", oldest)
            del self.pending[oldest]

    async def flush(self) -> int:
        """Send what is pending; returns how many groups were sent."""
        if not self.pending:
            return 0
        batch, self.pending = self.pending, {}
        records: list[dict[str, Any]] = [
            {"project_id": p, "key_id": k, "deployment": d, "model_version": v, "minute": m}
            | {f: sums[f] for f in FIELDS}
            for (p, k, d, v, m), sums in batch.items()
        ]
        try:
            resp = await self.http.post("/v1/internal/usage", json={"records": records})
            resp.raise_for_status()
        except Exception as exc:
            log.warning("usage not sent (%s); kept for the next batch", exc)
            for group, sums in batch.items():  # merge back: newer sums may exist already
                self.pending.setdefault(group, Counter()).update(sums)
            return 0
        return len(records)

    async def flush_forever(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self.flush()
