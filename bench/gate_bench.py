"""The front door's per-request checks: a key against 10,000 digests, then a quota
admit and its token count, in process and through Redis (127.0.0.1:6379).

    python bench/gate_bench.py
"""

from __future__ import annotations

import asyncio
import time
import uuid

from thinkforge.contract import key_digest
from thinkforge.serve.access import Caller, Directory, Quota
from thinkforge.serve.quotas import MemoryLimiter, RedisLimiter

secret = "s" * 40
keys = {key_digest(secret, f"tf-{i}"): Caller(f"key-{i}", "p", "inference") for i in range(10000)}
d = Directory(keys=keys)
n = 20000
t = time.perf_counter()
for i in range(n):
    d.caller(secret, f"tf-{i % 10000}")
print(f"key check (HMAC + dict, 10k keys): {(time.perf_counter() - t) / n * 1e6:.1f} us")


async def run(lim, label):
    q = Quota(10**9, 10**12)
    for _ in range(100):
        await lim.admit("warm", q)
    t = time.perf_counter()
    for i in range(n // 4):
        await lim.admit(f"k{i % 100}", q)
        await lim.add_tokens(f"k{i % 100}", 10)
    print(f"{label}: admit + add_tokens {(time.perf_counter() - t) / (n // 4) * 1e3:.3f} ms")


asyncio.run(run(MemoryLimiter(), "in-process limiter"))
r = RedisLimiter("redis://127.0.0.1:6379/0", prefix=f"bench-{uuid.uuid4().hex}")
asyncio.run(run(r, "Redis limiter"))
