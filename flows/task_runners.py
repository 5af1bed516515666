"""Task-runner choice for the image shards: threads, processes or a Dask cluster.

Why a separate module: it is the only place that knows Prefect's runner classes and ``prefect-dask``; the CLI and
deployments pass plain strings."""

from __future__ import annotations

from typing import Any

from sand.pipeline.base.errors import ConfigError

RUNNERS = ("threads", "processes", "dask")


def make_task_runner(name: str = "threads", dask_address: str | None = None, workers: int | None = None) -> Any:
    """A Prefect task runner; ``dask`` with no address starts a local cluster."""
    if name == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner  # lazy: Prefect is slow to import

        return ThreadPoolTaskRunner(max_workers=workers)
    if name == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner  # lazy: Prefect is slow to import

        return ProcessPoolTaskRunner(max_workers=workers)
    if name == "dask":
        from prefect_dask import DaskTaskRunner  # lazy: optional, and imports Dask

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        kwargs: dict[str, Any] = {"n_workers": workers or 2, "threads_per_worker": 1, "processes": True}
        return DaskTaskRunner(cluster_kwargs=kwargs)
    raise ConfigError(f"invalid runner {name!r}: choose one of {', '.join(RUNNERS)}")
