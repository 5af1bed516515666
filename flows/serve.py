"""Deployments for the Prefect UI: the end-to-end flow and every stage, on a schedule. ``sand serve`` runs them in a
long-running process (no work pool or infrastructure block: the simplest setup); ``sand deploy --work-pool NAME``
registers them with a pool whose workers run them (deploy once, add workers without touching the deployments). Why
module-path entrypoints (``sand.flows.pipeline_flows.pipeline_flow``), not file paths: a deployment loads the installed
package wherever it lives, whatever the worker's directory, with no code storage, git source or image build."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sand.flows.run_options import RunOptions
from sand.pipeline.base.config import PipelineConfig
from sand.pipeline.base.errors import ConfigError

DEFAULT_CRON = "0 3 * * 0"  # weekly, Sunday 03:00: retrain on the week's data


def build_deployments(config: PipelineConfig, cron: str | None = None, options: RunOptions | None = None) -> list[Any]:
    """``sand-pipeline/retrain``, ``sand-retrain/scheduled`` (on the cron), ``sand-<stage>/on-demand``; ``config`` and
    ``options`` (default: the threads runner) are every run's defaults, editable per run in the UI form."""
    from prefect.deployments.runner import EntrypointType, RunnerDeployment  # lazy: Prefect is slow to import

    from sand.flows.pipeline_flows import STAGE_FLOWS, pipeline_flow, stage_flow_entrypoint  # lazy: imports Prefect
    from sand.flows.retrain import retrain_flow  # lazy: imports Prefect
    options = options or RunOptions()
    params = {"config": config.model_dump(mode="json"), "options": options.model_dump(mode="json")}
    common = {"parameters": params, "entrypoint_type": EntrypointType.MODULE_PATH}
    return [
        pipeline_flow.to_deployment(
            name="retrain", cron=cron or DEFAULT_CRON, tags=["sand", "retrain"], **common,
            description="End-to-end SAND pipeline: acquire to evaluate; cached stages are reused."),
        retrain_flow.to_deployment(
            name="scheduled", cron=cron or DEFAULT_CRON, tags=["sand", "retrain"], **common,
            description="Retrain when the sources changed, promote the better of challenger and champion, "
            "publish its top-K to <data-root>/published/<dataset>/."),
        # Stage flows are generated from the stage table: their module path is given, not derived.
        *(RunnerDeployment.from_entrypoint(
            stage_flow_entrypoint(stage), name="on-demand", tags=["sand", "stage", stage], parameters=params,
            description=f"Run the {stage} stage alone (inputs reused from the artifact store)."
        ) for stage in STAGE_FLOWS),
    ]


def serve_deployments(config: PipelineConfig, cron: str | None = None) -> None:
    from prefect import serve  # lazy: Prefect is slow to import
    serve(*build_deployments(config, cron))


def deploy_to_work_pool(config: PipelineConfig, work_pool: str, cron: str | None = None,
                        options: RunOptions | None = None) -> dict[str, Any]:
    """Register every deployment with the existing ``work_pool``. Why ``RunnerDeployment.apply``, not
    ``prefect.deploy``: that one builds and pushes a Docker image (or demands code storage) and prints Rich tables. The
    data root is made absolute: a process worker runs each flow in a temporary directory, where ``./data`` is lost."""
    from prefect import get_client  # lazy: Prefect is slow to import
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus  # lazy: Prefect is slow to import
    from prefect.exceptions import ObjectNotFound  # lazy: Prefect is slow to import
    options = options or RunOptions()
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(work_pool)
        except ObjectNotFound:
            raise ConfigError(f"Prefect work pool {work_pool!r} does not exist at {client.api_url}: create it with "
                              f"`prefect work-pool create {work_pool} --type process`") from None
        online = client.read_workers_for_work_pool(
            work_pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])))
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
    """Code storage (Prefect's ``RunnerStorage``) for code already installed where the flows run. Why: without storage,
    a process worker copies the deploying command's working directory (recorded at deploy time) into each run's
    workspace; it may not exist on the worker's machine (the run fails) or hold the data root (every run copies it). The
    one pull step, ``set_working_directory: .``, leaves the run where the worker puts it (its ``working_dir``)."""

    destination = Path(".")
    pull_interval = None

    def set_base_path(self, path: Path) -> None:
        """Nothing is pulled, so there is no base path to set."""

    async def pull_code(self) -> None:
        """The package is installed on every worker: nothing to pull."""

    def to_pull_step(self) -> dict[str, Any]:
        return {"prefect.deployments.steps.set_working_directory": {"directory": "."}}
