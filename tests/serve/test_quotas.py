"""Front-door quotas: a fixed minute window per key, in memory and shared through Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from thinkforge.serve.access import Quota
from thinkforge.serve.quotas import MemoryLimiter, RedisLimiter

REDIS = "redis://127.0.0.1:6379/0"


class Clock:
    def __init__(self, now: float = 1_000_040.0) -> None:  # 20 s into a window
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_memory_limiter_requests_tokens_and_window() -> None:
    async def run() -> None:
        clock = Clock()
        limiter = MemoryLimiter(clock)
        quota = Quota(requests_per_minute=2, tokens_per_minute=100)
        first = await limiter.admit("k", quota)
        assert first.allowed and first.headers()["x-ratelimit-remaining-requests"] == "1"
        assert "Retry-After" not in first.headers()
        assert (await limiter.admit("k", quota)).allowed
        refused = await limiter.admit("k", quota)
        assert not refused.allowed and refused.which() == "requests"
        headers = refused.headers()
        assert headers["Retry-After"] == "40" and headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-limit-tokens"] == "100"
        assert (await limiter.admit("other", quota)).allowed  # per key

        clock.now += 40  # the next window
        assert (await limiter.admit("k", quota)).allowed
        await limiter.add_tokens("k", 100)
        over = await limiter.admit("k", quota)
        assert not over.allowed and over.which() == "tokens"
        assert over.headers()["x-ratelimit-remaining-tokens"] == "0"

    asyncio.run(run())


@pytest.mark.redis
def test_redis_limiter_is_shared_across_replicas() -> None:
    async def run() -> None:
        clock = Clock()
        prefix = f"test-{uuid.uuid4().hex}"
        a, b = (RedisLimiter(REDIS, prefix=prefix, clock=clock) for _ in range(2))
        quota = Quota(requests_per_minute=3, tokens_per_minute=50)
        try:
            allowed = [(await lim.admit("k", quota)).allowed for lim in (a, b, a, b)]
            assert allowed == [True, True, True, False]  # one count for both replicas
            clock.now += 60
            assert (await b.admit("k", quota)).allowed
            await a.add_tokens("k", 50)
            refused = await b.admit("k", quota)
            assert not refused.allowed and refused.which() == "tokens"
            assert refused.headers()["Retry-After"] == "40"
        finally:
            await a.close()
            await b.close()

    asyncio.run(run())


def test_redis_down_counts_in_memory() -> None:
    async def run() -> None:
        limiter = RedisLimiter("redis://127.0.0.1:1/0", clock=Clock())
        quota = Quota(requests_per_minute=1, tokens_per_minute=10)
        assert (await limiter.admit("k", quota)).allowed
        assert not (await limiter.admit("k", quota)).allowed
        await limiter.close()

    asyncio.run(run())
