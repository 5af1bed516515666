"""Deployments for the Prefect UI: the end-to-end flow and every stage, on a schedule.

Why ``flow.to_deployment`` + ``prefect.serve``: it needs no work pool or
infrastructure block; ``sand serve`` is a long-running process that picks up
scheduled and UI-triggered runs, and each deployment's parameters default to
the config given at serve time (editable per run in the UI form). Entrypoints are
module paths (``sand.flows.pipeline_flows.pipeline_flow``), not file paths, so a
deployment loads the installed package wherever it lives (a wheel in a container,
an editable checkout), whatever the worker's current directory.
"""

from __future__ import annotations

from typing import Any

from sand.pipeline.config import PipelineConfig

# Prefect (and our modules that need them): imported inside the functions that use them,
# so importing this module (and `sand --help`) stays fast.

DEFAULT_CRON = "0 3 * * 0"  # weekly, Sunday 03:00: retrain on the week's data


def build_deployments(config: PipelineConfig, cron: str | None = None) -> list[Any]:
    """RunnerDeployments: ``sand-pipeline/retrain`` (scheduled) and ``sand-<stage>/on-demand``."""
    from prefect.deployments.runner import EntrypointType, RunnerDeployment

    from sand.flows.pipeline_flows import STAGE_FLOWS, RunOptions, pipeline_flow, stage_flow_entrypoint

    params = {"config": config.model_dump(mode="json"), "options": RunOptions().model_dump(mode="json")}
    common = {"parameters": params, "entrypoint_type": EntrypointType.MODULE_PATH}
    deployments = [
        pipeline_flow.to_deployment(
            name="retrain", cron=cron or DEFAULT_CRON, tags=["sand", "retrain"], **common,
            description="End-to-end SAND pipeline: acquire to evaluate; cached stages are reused.",
        )
    ]
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
    from prefect import serve

    serve(*build_deployments(config, cron))
