"""Prefect defaults that suit a local, offline pipeline command.

Applied by the CLI before torch is imported (OpenMP reads its settings once).

Why: on a busy 2-core machine the ephemeral API server (Prefect's no-server
mode) can need more than its default 20 s to start, and an offline machine
should not try to send telemetry. Users' explicit environment settings win.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",  # Prefect's client-side telemetry (and its first-run notice on a terminal)
    "PREFECT_UI_ENABLED": "true",
    # Idle OpenMP threads sleep instead of spinning: on a shared or oversubscribed CPU, spinning
    # threads made each small torch op (SAND's CLUB steps) ~15x slower in our measurements.
    "OMP_WAIT_POLICY": "PASSIVE",
    # Big tensors (SAND's 4096 x 4096 weight, its gradient and bfloat16 copies) on transparent
    # huge pages: each fresh allocation then faults in 512x fewer pages; the weight-gradient
    # product and its conversion ran ~2x faster (torch reads this once, at its first allocation).
    "THP_MEM_ALLOC_ENABLE": "1",
}


def apply_prefect_defaults() -> None:
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
