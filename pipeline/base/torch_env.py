"""Environment settings that torch and its OpenMP runtime read once, at start-up.

The ``sand`` command, the test suite and the benchmarks all want them, and they only take effect when set before torch
is imported, so this module imports nothing heavy and callers apply it first thing. Users' explicit settings win."""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType

TORCH_ENV_DEFAULTS: Mapping[str, str] = MappingProxyType({
    # Idle OpenMP threads sleep instead of spinning: on a shared or oversubscribed CPU, spinning threads slow down
    # every small torch op (SAND's CLUB steps).
    "OMP_WAIT_POLICY": "PASSIVE",
    # Big tensors (SAND's 4096 x 4096 weight, its gradient and bfloat16 copies) on transparent huge pages: each fresh
    # allocation faults in 512x fewer pages (torch reads this once, at its first allocation).
    "THP_MEM_ALLOC_ENABLE": "1",
})


def apply_torch_env_defaults(environ: dict[str, str] | None = None) -> None:
    """Set each default in ``environ`` (the process's environment) unless it is already set."""
    target = os.environ if environ is None else environ
    for name, value in TORCH_ENV_DEFAULTS.items():
        target.setdefault(name, value)
