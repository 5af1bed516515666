"""Deployments for the Prefect UI: the end-to-end flow and every stage, on a schedule.

Why ``flow.to_deployment`` + ``prefect.serve``: it needs no work pool or
infrastructure block; ``sand serve`` is a long-running process that picks up
scheduled and UI-triggered runs, and each deployment's parameters default to
the config given at serve time (editable per run in the UI form).
"""

from __future__ import annotations

from typing import Any

from sand.pipeline.config import PipelineConfig

DEFAULT_CRON = "0 3 * * 0"  # weekly, Sunday 03:00: retrain on the week's data


def build_deployments(config: PipelineConfig, cron: str | None = None) -> list[Any]:
    """RunnerDeployments: ``sand-pipeline/retrain`` (scheduled) and ``sand-<stage>/on-demand``."""
    from sand.flows.pipeline_flows import STAGE_FLOWS, RunOptions, pipeline_flow

    params = {"config": config.model_dump(mode="json"), "options": RunOptions().model_dump(mode="json")}
    deployments = [
        pipeline_flow.to_deployment(
            name="retrain", cron=cron or DEFAULT_CRON, parameters=params, tags=["sand", "retrain"],
            description="End-to-end SAND pipeline: acquire to evaluate; cached stages are reused.",
        )
    ]
    for stage, stage_flow in STAGE_FLOWS.items():
        deployments.append(
            stage_flow.to_deployment(
                name="on-demand", parameters=params, tags=["sand", "stage", stage],
                description=f"Run the {stage} stage alone (inputs reused from the artifact store).",
            )
        )
    return deployments


def serve_deployments(config: PipelineConfig, cron: str | None = None) -> None:
    from prefect import serve

    serve(*build_deployments(config, cron))
