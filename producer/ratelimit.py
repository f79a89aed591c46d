"""Per-key rate limit: at most ``BANTER_RATE_LIMIT_PER_MIN`` requests per API key per minute.

A fixed window per key id and wall-clock minute, counted in Redis (``keys.rate_limit``), so
every producer process in front of the same Redis shares the count. A request over the limit is
answered 429 with ``Retry-After`` (the seconds left in the minute) and is not run.
"""

from __future__ import annotations

import math
import time

import redis

from banter import keys
from banter.errors import RateLimited

WINDOW_S = 60


def check(client: redis.Redis, key_id: str, limit: int) -> None:
    """Count one request of ``key_id``; RateLimited when it is over ``limit`` this minute."""
    now = time.time()
    window = int(now // WINDOW_S)
    pipe = client.pipeline(transaction=False)
    pipe.incr(keys.rate_limit(key_id, window))
    pipe.expire(keys.rate_limit(key_id, window), WINDOW_S * 2)
    count, _ = pipe.execute()
    if count > limit:
        retry_after = max(1, math.ceil((window + 1) * WINDOW_S - now))
        raise RateLimited(f"this API key sent more than {limit} requests this minute "
                          f"(BANTER_RATE_LIMIT_PER_MIN); retry in {retry_after} s",
                          retry_after)
