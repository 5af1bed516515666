"""Environment settings that torch and its OpenMP runtime read once, at start-up.

Why a module of its own: the ``sand`` command, the test suite and the benchmarks all want these, and they only take
effect when set before torch is imported (OpenMP reads its settings once; torch reads the allocator's at its first
allocation). So this module imports nothing heavy, and callers apply it first thing. Users' explicit environment
settings win."""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType

TORCH_ENV_DEFAULTS: Mapping[str, str] = MappingProxyType({
    # Idle OpenMP threads sleep instead of spinning: on a shared or oversubscribed CPU, spinning
    # threads made each small torch op (SAND's CLUB steps) ~15x slower in our measurements.
    "OMP_WAIT_POLICY": "PASSIVE",
    # Big tensors (SAND's 4096 x 4096 weight, its gradient and bfloat16 copies) on transparent
    # huge pages: each fresh allocation then faults in 512x fewer pages; the weight-gradient
    # product and its conversion ran ~2x faster (torch reads this once, at its first allocation).
    "THP_MEM_ALLOC_ENABLE": "1",
})


def apply_torch_env_defaults(environ: dict[str, str] | None = None) -> None:
    """Set each default in ``environ`` (the process's environment) unless it is already set."""
    target = os.environ if environ is None else environ
    for name, value in TORCH_ENV_DEFAULTS.items():
        target.setdefault(name, value)
