"""One retry policy for every network fetch, so raw-file downloads and image fetches agree on what is worth retrying.
Retried: timeouts, connection resets, 5xx, 429; final: other 4xx (else a dead image URL is hammered or a flaky mirror
gives up too early). Not a library: httpx retries only failed connects (not statuses or bodies cut mid-read), and
tenacity's and stamina's jitter uses the unseeded global ``random`` while runs here must repeat exactly."""

from __future__ import annotations

import random
from collections.abc import Iterator

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUS or 500 <= status < 600


def backoff_delays(retries: int, base: float = 0.5, cap: float = 30.0, jitter: float = 0.1,
                   seed: int | None = None) -> Iterator[float]:
    """Exponential back-off delays (s) for ``retries`` more attempts; seeded jitter keeps concurrent workers out of
    lock-step."""
    rng = random.Random(seed)
    for attempt in range(retries):
        delay = min(cap, base * (2**attempt))
        yield delay * (1.0 + jitter * rng.random())
