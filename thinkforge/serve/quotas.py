"""Per-key quotas on the front door: requests and tokens per minute.

A fixed one-minute window per key: a request is admitted while the key has made fewer
than ``requests_per_minute`` requests and used fewer than ``tokens_per_minute`` tokens
(prompt plus completion) in this window; its tokens count when it has been answered (they
are not known before). With ``redis_url`` every front-door replica shares the counters in
Redis (one Lua script: check and count in one step); without it, or while Redis is
unreachable, each replica counts alone in memory.

    limiter = make_limiter(redis_url)
    decision = await limiter.admit("key-…", Quota(60, 100_000))
    if not decision.allowed: 429 with decision.headers()
    await limiter.add_tokens("key-…", 123)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from thinkforge.serve.access import Quota

log = logging.getLogger(__name__)
WINDOW_S = 60

__all__ = ["Decision", "Limiter", "MemoryLimiter", "RedisLimiter", "make_limiter"]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    quota: Quota
    requests: int  # counted in this window, this request included when allowed
    tokens: int
    reset_s: float  # until the window ends

    def headers(self) -> dict[str, str]:
        """OpenAI's rate-limit headers, plus ``Retry-After`` on a refusal."""
        q = self.quota
        headers = {
            "x-ratelimit-limit-requests": str(q.requests_per_minute),
            "x-ratelimit-remaining-requests": str(max(0, q.requests_per_minute - self.requests)),
            "x-ratelimit-limit-tokens": str(q.tokens_per_minute),
            "x-ratelimit-remaining-tokens": str(max(0, q.tokens_per_minute - self.tokens)),
            "x-ratelimit-reset-requests": f"{math.ceil(self.reset_s)}s",
            "x-ratelimit-reset-tokens": f"{math.ceil(self.reset_s)}s",
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.reset_s)))
        return headers

    def which(self) -> str:
        return "requests" if self.requests >= self.quota.requests_per_minute else "tokens"


class Limiter(Protocol):
    async def admit(self, key_id: str, quota: Quota) -> Decision: ...

    async def add_tokens(self, key_id: str, tokens: int) -> None: ...


def _window(now: float) -> tuple[int, float]:
    start = int(now // WINDOW_S) * WINDOW_S
    return start, start + WINDOW_S - now


class MemoryLimiter:
    """Counters in this process (one front-door replica)."""

    def __init__(self, clock: Any = time.time) -> None:
        self.clock = clock
        self.counts: dict[str, tuple[int, int, int]] = {}  # key -> (window, requests, tokens)

    def _current(self, key_id: str) -> tuple[int, int, int, float]:
        window, reset = _window(self.clock())
        seen, requests, tokens = self.counts.get(key_id, (window, 0, 0))
        if seen != window:
            requests, tokens = 0, 0
        return window, requests, tokens, reset

    async def admit(self, key_id: str, quota: Quota) -> Decision:
        window, requests, tokens, reset = self._current(key_id)
        if requests >= quota.requests_per_minute or tokens >= quota.tokens_per_minute:
            return Decision(False, quota, requests, tokens, reset)
        self.counts[key_id] = (window, requests + 1, tokens)
        if len(self.counts) > 100_000:  # keys idle for a window are forgotten
            self.counts = {k: v for k, v in self.counts.items() if v[0] == window}
        return Decision(True, quota, requests + 1, tokens, reset)

    async def add_tokens(self, key_id: str, tokens: int) -> None:
        window, requests, used, _ = self._current(key_id)
        self.counts[key_id] = (window, requests, used + tokens)


# KEYS: requests counter, tokens counter. ARGV: request limit, token limit, ttl.
_ADMIT = """
local r = tonumber(redis.call('GET', KEYS[1]) or '0')
local t = tonumber(redis.call('GET', KEYS[2]) or '0')
if r >= tonumber(ARGV[1]) or t >= tonumber(ARGV[2]) then return {0, r, t} end
r = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, r, t}
"""


class RedisLimiter:
    """Counters in Redis, shared by every front-door replica; in memory while it is down."""

    def __init__(self, url: str, *, prefix: str = "thinkforge:quota", clock: Any = time.time):
        import redis.asyncio as redis

        self.redis = redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        self.prefix = prefix
        self.clock = clock
        self.script = self.redis.register_script(_ADMIT)
        self.fallback = MemoryLimiter(clock)

    def _keys(self, key_id: str, window: int) -> list[str]:
        return [f"{self.prefix}:{key_id}:{window}:{kind}" for kind in ("requests", "tokens")]

    async def admit(self, key_id: str, quota: Quota) -> Decision:
        window, reset = _window(self.clock())
        args = [quota.requests_per_minute, quota.tokens_per_minute, 2 * WINDOW_S]
        try:
            ok, requests, tokens = await self.script(keys=self._keys(key_id, window), args=args)
        except Exception as exc:  # availability first: count alone until Redis is back
            log.warning("quota counters in Redis unavailable (%s); counting in memory", exc)
            return await self.fallback.admit(key_id, quota)
        return Decision(bool(ok), quota, int(requests), int(tokens), reset)

    async def add_tokens(self, key_id: str, tokens: int) -> None:
        window, _ = _window(self.clock())
        key = self._keys(key_id, window)[1]
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incrby(key, tokens)
                pipe.expire(key, 2 * WINDOW_S)
                await pipe.execute()
        except Exception as exc:
            log.warning("quota counters in Redis unavailable (%s); counting in memory", exc)
            await self.fallback.add_tokens(key_id, tokens)

    async def close(self) -> None:
        await self.redis.aclose()


def make_limiter(redis_url: str) -> Limiter:
    return RedisLimiter(redis_url) if redis_url else MemoryLimiter()
