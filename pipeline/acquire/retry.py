"""One retry policy for every network fetch (raw files and item images).

Why shared: downloads and image fetches must agree on what is worth retrying (timeouts, connection resets, 5xx, 429) and
what is final (404 and other 4xx), otherwise a dead image URL is hammered or a flaky mirror gives up too early.

Why not a library: httpx's transports retry only failed connects (not statuses or bodies cut mid-read), and tenacity's
and stamina's jitter draws from the unseeded global ``random``, while runs here must repeat exactly (seeded jitter); the
callers' loops keep the resume and the reason."""

from __future__ import annotations

import random
from collections.abc import Iterator

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def is_retryable_status(status: int) -> bool:
    """True for statuses where trying again may succeed (5xx, 408, 429)."""
    return status in RETRYABLE_STATUS or 500 <= status < 600


def backoff_delays(
    retries: int, base: float = 0.5, cap: float = 30.0, jitter: float = 0.1, seed: int | None = None
) -> Iterator[float]:
    """Exponential back-off delays (seconds) for ``retries`` further attempts.

    A small seeded jitter avoids many concurrent workers retrying in lock-step."""
    rng = random.Random(seed)
    for attempt in range(retries):
        delay = min(cap, base * (2**attempt))
        yield delay * (1.0 + jitter * rng.random())
