"""Deployments for the Prefect UI: the end-to-end flow and every stage, on a schedule.

Two ways to run them, one set of deployments (:func:`build_deployments`):

* ``sand serve`` (:func:`serve_deployments`): ``prefect.serve`` in a long-running
  process that picks up scheduled and UI-triggered runs itself. It needs no work
  pool or infrastructure block: the simplest setup, on the machine that runs the flows.
* ``sand deploy --work-pool NAME`` (:func:`deploy_to_work_pool`): registers the same deployments with an existing work
  pool and returns; the pool's workers (``prefect worker start --pool NAME``, on the GPU node of a cluster) run the
  flows. Deploying and running are then separate: deploy once from anywhere, restart or add workers without touching the
  deployments.

Each deployment's parameters default to the config (and run options: task runner, Dask scheduler) given at deploy time,
editable per run in the UI form. Entrypoints are module paths (``sand.flows.pipeline_flows.pipeline_flow``), not file
paths, so a deployment loads the installed package wherever it lives (a wheel in a container, an editable checkout),
whatever the worker's current directory: no code storage, git source or image build is involved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sand.flows.run_options import RunOptions
from sand.pipeline.base.config import PipelineConfig
from sand.pipeline.base.errors import ConfigError

DEFAULT_CRON = "0 3 * * 0"  # weekly, Sunday 03:00: retrain on the week's data


def build_deployments(config: PipelineConfig, cron: str | None = None, options: RunOptions | None = None) -> list[Any]:
    """Deployments: ``sand-pipeline/retrain``, ``sand-retrain/scheduled`` (on the cron), ``sand-<stage>/on-demand``.

    ``options`` (default: ``RunOptions()``, the threads runner) are the run options every run of these deployments gets
    unless the run overrides them."""
    from prefect.deployments.runner import EntrypointType, RunnerDeployment  # lazy: Prefect is slow to import

    from sand.flows.pipeline_flows import STAGE_FLOWS, pipeline_flow, stage_flow_entrypoint  # lazy: imports Prefect

    options = options or RunOptions()
    params = {"config": config.model_dump(mode="json"), "options": options.model_dump(mode="json")}
    common = {"parameters": params, "entrypoint_type": EntrypointType.MODULE_PATH}
    deployments = [
        pipeline_flow.to_deployment(
            name="retrain", cron=cron or DEFAULT_CRON, tags=["sand", "retrain"], **common,
            description="End-to-end SAND pipeline: acquire to evaluate; cached stages are reused.",
        )
    ]
    # -- scheduled retraining: new data? challenger, comparison, promotion, publication (flows/retrain.py)
    from sand.flows.retrain import retrain_flow  # lazy: imports Prefect

    deployments.append(retrain_flow.to_deployment(
        name="scheduled", cron=cron or DEFAULT_CRON, tags=["sand", "retrain"], **common,
        description="Retrain when the sources changed, promote the better of challenger and champion, "
        "publish its top-K to <data-root>/published/<dataset>/.",
    ))
    for stage in STAGE_FLOWS:
        # Stage flows are generated from the stage table: their module path is given, not derived.
        deployments.append(
            RunnerDeployment.from_entrypoint(
                stage_flow_entrypoint(stage), name="on-demand", tags=["sand", "stage", stage], parameters=params,
                description=f"Run the {stage} stage alone (inputs reused from the artifact store).",
            )
        )
    return deployments


def serve_deployments(config: PipelineConfig, cron: str | None = None) -> None:
    from prefect import serve  # lazy: Prefect is slow to import

    serve(*build_deployments(config, cron))


def deploy_to_work_pool(
    config: PipelineConfig, work_pool: str, cron: str | None = None, options: RunOptions | None = None
) -> dict[str, Any]:
    """Register every deployment with the existing work pool ``work_pool``; returns what was registered.

    Why ``RunnerDeployment.apply(work_pool_name=...)`` and not ``prefect.deploy``: the latter exists to build and push a
    Docker image (or demands code storage) and prints Rich tables; module-path entrypoints need neither, and ``apply``
    registers exactly the deployment. The data root is made absolute first: a process worker runs each flow in a
    temporary working directory, where ``./data`` would be a fresh, lost folder. Each deployment gets
    :class:`InstalledPackage` as its code storage (see there why). Raises ConfigError (one line) when the pool does not
    exist."""
    from prefect import get_client  # lazy: Prefect is slow to import
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus  # lazy: Prefect is slow to import
    from prefect.exceptions import ObjectNotFound  # lazy: Prefect is slow to import

    options = options or RunOptions()

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(work_pool)
        except ObjectNotFound:
            raise ConfigError(
                f"Prefect work pool {work_pool!r} does not exist at {client.api_url}: create it with "
                f"`prefect work-pool create {work_pool} --type process`"
            ) from None
        online = client.read_workers_for_work_pool(
            work_pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
        )
    absolute = config.model_copy(update={"data_root": config.data_root.absolute()})
    registered = []
    for deployment in build_deployments(absolute, cron, options):
        deployment.storage = InstalledPackage()
        deployment_id = deployment.apply(work_pool_name=work_pool)
        registered.append({"name": f"{deployment.flow_name}/{deployment.name}", "id": str(deployment_id),
                           "cron": next((getattr(s.schedule, "cron", None) for s in deployment.schedules), None)})
    return {"work_pool": work_pool, "work_pool_type": pool.type, "workers_online": len(online),
            "data_root": str(absolute.data_root), "options": options.model_dump(mode="json"),
            "deployments": registered}


class InstalledPackage:
    """Code storage (Prefect's ``RunnerStorage``) for code already installed where the flows run.

    Why: a work-pool deployment without storage makes a process worker copy a directory into each run's workspace before
    the run starts: the deploying command's working directory, recorded at deploy time. That directory may not exist on
    the worker's machine (the run fails), or may hold the data root (every run copies it). Our entrypoints are module
    paths of the installed package, so there is nothing to copy: the one pull step, ``set_working_directory: .``, leaves
    the run in the working directory the worker gives it (its ``working_dir`` job variable, else a temporary one)."""

    destination = Path(".")
    pull_interval = None

    def set_base_path(self, path: Path) -> None:
        """Nothing is pulled, so there is no base path to set."""

    async def pull_code(self) -> None:
        """The package is installed on every worker: nothing to pull."""

    def to_pull_step(self) -> dict[str, Any]:
        return {"prefect.deployments.steps.set_working_directory": {"directory": "."}}
