"""The ``sand-retrain`` flow: a scheduled retrain that decides which model is in use and publishes it. Why not the
``sand-pipeline`` deployment: nothing there notices that no data arrived, compares the new model with the one in use, or
publishes recommendations. The steps live in ``pipeline/serving/retrain.py`` (no Prefect); this flow supplies the
nested ``sand-pipeline`` run and shows the decision on the flow run's page."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.states import Completed

from sand.flows.pipeline_flows import RunOptions, pipeline_flow
from sand.flows.ui import _safe
from sand.pipeline.base.config import PipelineConfig
from sand.pipeline.serving.retrain import RetrainReport, retrain_once


def retrain_markdown(report: RetrainReport) -> str:
    """The decision and its numbers, as markdown."""
    lines = [f"# Retrain of {report.model} on {report.dataset}: {report.status}", "", report.message, ""]
    if report.changes:
        lines += ["## What changed", "", *(f"- {c}" for c in report.changes), ""]
    if report.decision:
        d, details = report.decision, report.decision["details"]
        lines += ["## Decision", "", "| | value |", "|---|---|",
                  f"| challenger | {d['challenger']} |", f"| champion before | {d['champion']} |",
                  f"| promoted | {d['promoted']} |"]
        for name in ("metric", "challenger_value", "champion_value", "relative_change", "max_drop", "users",
                     "items", "valid_pairs"):
            value = details.get(name)
            if value is not None:
                lines.append(f"| {name.replace('_', ' ')} | {f'{value:.4f}' if isinstance(value, float) else value} |")
        lines.append("")
    if report.published:
        p = report.published
        lines += ["## Published", "", f"model {p['model_key']}, top-{p['k']} for {p['users']} users "
                  f"({p['rows']} rows), snapshot {p['snapshot']}"]
    return "\n".join(lines)


@flow(name="sand-retrain", log_prints=True)
def retrain_flow(config: PipelineConfig | None = None, options: RunOptions | None = None) -> Any:
    """New data? Train a challenger, compare it with the champion, promote the better, publish its top-K."""
    from prefect.artifacts import create_markdown_artifact  # lazy: Prefect is slow to import
    config = config or PipelineConfig()
    options = options or RunOptions()
    report = retrain_once(config, lambda cfg: pipeline_flow(config=cfg, options=options, until="evaluate").artifacts())
    _safe(lambda: create_markdown_artifact(key="sand-retrain-decision", markdown=retrain_markdown(report)))
    if report.status == "no new data":
        return Completed(message=report.message, name="No new data", data=report.to_dict())
    return report.to_dict()
