"""How to run (not what to compute): the run options every stage flow and the CLI share. Why no Prefect here: the CLI
validates these before it knows whether the run needs Prefect (a fully cached run does not), and its help for
``--runner``, ``--dask-address`` and ``--refresh`` is these fields' descriptions. Only :func:`make_task_runner` knows
Prefect's runner classes and ``prefect-dask``; the CLI and deployments pass strings."""

from __future__ import annotations

import sys
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sand.pipeline.base.errors import ConfigError
from sand.pipeline.stages import STAGE_NAMES

#: Task runners for the image and text shards: threads, processes or a Dask cluster.
RUNNERS = ("threads", "processes", "dask")


class RunOptions(BaseModel):
    """How to run (not what to compute): never part of an artifact key."""

    model_config = ConfigDict(extra="forbid")

    refresh: list[str] = Field(default_factory=list, description="stages to rebuild even if cached")
    runner: str = Field("threads", description=f"task runner for image and text shards: {' | '.join(RUNNERS)}")
    dask_address: str | None = Field(None, description="tcp://host:port of an existing Dask scheduler (runner dask)")
    workers: int | None = Field(None, ge=1, description="shard workers (default: the runner's)")
    progress: bool | None = Field(None, description="progress bars on stderr (default: when it is a terminal)")

    def show_progress(self) -> bool:
        """Bars only where someone watches: in a captured log they are noise around the one error line."""
        return self.progress if self.progress is not None else sys.stderr.isatty()

    @field_validator("refresh")
    @classmethod
    def _known_stages(cls, value: list[str]) -> list[str]:
        unknown = [s for s in value if s not in STAGE_NAMES]
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r}: choose from {', '.join(STAGE_NAMES)}")
        return value

    @field_validator("runner")
    @classmethod
    def _known_runner(cls, value: str) -> str:
        if value not in RUNNERS:
            raise ValueError(f"unknown runner {value!r}: choose from {', '.join(RUNNERS)}")
        return value


def make_task_runner(name: str = "threads", dask_address: str | None = None, workers: int | None = None) -> Any:
    """A Prefect task runner; ``dask`` with no address starts a local cluster."""
    if name in ("threads", "processes"):
        from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner  # lazy: Prefect is slow to import
        return (ThreadPoolTaskRunner if name == "threads" else ProcessPoolTaskRunner)(max_workers=workers)
    if name == "dask":
        from prefect_dask import DaskTaskRunner  # lazy: optional, and imports Dask
        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers or 2, "threads_per_worker": 1, "processes": True})
    raise ConfigError(f"invalid runner {name!r}: choose one of {', '.join(RUNNERS)}")
