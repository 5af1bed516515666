"""Prefect defaults for a local, offline pipeline command, applied by the CLI before Prefect is imported (it reads its
settings when it starts). Why: on a busy 2-core machine the ephemeral API server can need more than its default 20 s to
start, and an offline machine should not send telemetry. Users' explicit environment settings win. The torch settings
live in :mod:`sand.pipeline.base.torch_env`."""

from __future__ import annotations

import os

DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",  # Prefect's client-side telemetry (and its first-run notice on a terminal)
    "PREFECT_UI_ENABLED": "true",
}


def apply_prefect_defaults() -> None:
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
