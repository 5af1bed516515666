"""Prefect flows: one per stage, and the end-to-end flow that nests them.

Why this shape: every stage is its own flow (a deployment of its own, a node
of its own in the UI), parameterised by the validated ``PipelineConfig`` so the
UI shows a form. Flows pass small references to artifacts (paths, keys,
manifests), never arrays. Caching is the artifact store's: a stage whose key
exists does no work and its flow run ends in a ``Cached`` completed state.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE as NO_CACHE
from prefect.states import Completed
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sand.flows.task_runners import RUNNERS, make_task_runner
from sand.flows.ui import publish_grid, publish_stage_artifacts, publish_summary
from sand.pipeline import stages
from sand.pipeline.config import STAGES, PipelineConfig
from sand.pipeline.runner import PipelineResult, planned_stages, resolve_upstream, run_stage
from sand.pipeline.store import Artifact, StageOutcome


class RunOptions(BaseModel):
    """How to run (not what to compute): never part of an artifact key."""

    model_config = ConfigDict(extra="forbid")

    refresh: list[str] = Field(default_factory=list, description="stages to rebuild even if cached")
    runner: str = Field("threads", description="task runner for image and text shards: threads | processes | dask")
    dask_address: str | None = Field(None, description="tcp://host:port of an existing Dask scheduler")
    workers: int | None = Field(None, ge=1, description="shard workers (default: the runner's)")
    progress: bool | None = Field(None, description="progress bars on stderr (default: when it is a terminal)")

    def show_progress(self) -> bool:
        """Bars only where someone watches: in a captured log they are noise around the one error line."""
        import sys

        return self.progress if self.progress is not None else sys.stderr.isatty()

    @field_validator("refresh")
    @classmethod
    def _known_stages(cls, value: list[str]) -> list[str]:
        unknown = [s for s in value if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r}: choose from {', '.join(STAGES)}")
        return value

    @field_validator("runner")
    @classmethod
    def _known_runner(cls, value: str) -> str:
        if value not in RUNNERS:
            raise ValueError(f"unknown runner {value!r}: choose from {', '.join(RUNNERS)}")
        return value


def outcome_ref(outcome: StageOutcome) -> dict[str, Any]:
    """A stage outcome as a small JSON-able reference (what flows return)."""
    art = outcome.artifact
    return {
        "stage": art.stage, "key": art.key, "path": str(art.path), "cached": outcome.cached,
        "seconds": outcome.seconds, "manifest": art.manifest,
    }


def outcome_from_ref(ref: dict[str, Any]) -> StageOutcome:
    from pathlib import Path

    art = Artifact(ref["stage"], ref["key"], Path(ref["path"]), ref["manifest"])
    return StageOutcome(art, ref["cached"], ref["seconds"])


@task(name="image-shard", cache_policy=NO_CACHE, retries=1)
def image_shard_task(job: tuple[Any, ...]) -> str:
    """Fetch, validate and encode one shard of item images; returns the shard file path."""
    return stages._run_shard_job(job)


@task(name="text-shard", cache_policy=NO_CACHE, retries=1)
def text_shard_task(job: Any) -> str:
    """Encode one shard of unique item texts; returns the shard file path."""
    return stages._run_text_shard_job(job)


def _task_mapper(options: RunOptions, shard_task: Any) -> stages.ShardMapper:
    """Map shard jobs with ``shard_task`` over the chosen task runner (threads, processes, Dask)."""

    def map_shards(_fn: Any, jobs: list[Any]) -> list[str]:
        runner = make_task_runner(options.runner, options.dask_address, options.workers)
        with runner:
            futures = runner.map(shard_task, {"job": list(jobs)})
            return [f.result() for f in futures]

    return map_shards


def _stage_body(stage: str, config: PipelineConfig, options: RunOptions) -> Any:
    ctx = stages.Context.create(config, options.refresh, progress=options.show_progress())
    # The report reads every evaluated run in the store, not one upstream chain.
    done = resolve_upstream(ctx, stage) if stage != "report" else {}
    shard_tasks = {"image_features": image_shard_task, "text_features": text_shard_task}
    mapper = _task_mapper(options, shard_tasks[stage]) if stage in shard_tasks else None
    outcome = run_stage(ctx, stage, done, mapper)
    publish_stage_artifacts(stage, outcome)
    ref = outcome_ref(outcome)
    if outcome.cached:
        return Completed(message=f"{stage}: cached artifact {outcome.artifact.key}", name="Cached", data=ref)
    return ref


def _make_stage_flow(stage: str):
    def stage_flow(config: PipelineConfig | None = None, options: RunOptions | None = None) -> dict[str, Any]:
        return _stage_body(stage, config or PipelineConfig(), options or RunOptions())

    stage_flow.__name__ = stage_flow.__qualname__ = f"{stage}_flow"
    stage_flow.__doc__ = f"Run the {stage} stage (upstream artifacts are reused or built first)."
    return flow(name=f"sand-{stage.replace('_', '-')}", log_prints=True)(stage_flow)


acquire_flow = _make_stage_flow("acquire")
interactions_flow = _make_stage_flow("interactions")
text_features_flow = _make_stage_flow("text_features")
image_features_flow = _make_stage_flow("image_features")
graphs_flow = _make_stage_flow("graphs")
train_flow = _make_stage_flow("train")
evaluate_flow = _make_stage_flow("evaluate")
report_flow = _make_stage_flow("report")

STAGE_FLOWS = {
    "acquire": acquire_flow,
    "interactions": interactions_flow,
    "text_features": text_features_flow,
    "image_features": image_features_flow,
    "graphs": graphs_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
    "report": report_flow,
}


@flow(name="sand-pipeline", log_prints=True)
def pipeline_flow(
    config: PipelineConfig | None = None, options: RunOptions | None = None, until: str | None = None
) -> dict[str, Any]:
    """End to end: raw Amazon data to a trained and evaluated model, each stage a nested flow."""
    config = config or PipelineConfig()
    options = options or RunOptions()
    result = PipelineResult()
    for stage in planned_stages(config.resolved(), until):
        ref = STAGE_FLOWS[stage](config=config, options=options)
        result.outcomes[stage] = outcome_from_ref(ref)
    summary = result.summary()
    publish_summary(summary)
    return summary


@flow(name="sand-grid", log_prints=True)
def grid_flow(
    config: PipelineConfig | None = None,
    axes: dict[str, list[Any]] | None = None,
    name: str = "grid",
    options: RunOptions | None = None,
    select_metric: str = "recall@20",
) -> dict[str, Any]:
    """Every combination of ``axes`` as a nested pipeline run; selection by validation metric."""
    from sand.pipeline.experiments.grid import run_grid

    config = config or PipelineConfig()
    options = options or RunOptions()

    def run_one(cfg: PipelineConfig) -> dict[str, Any]:
        return pipeline_flow(config=cfg, options=options, until="evaluate")

    result = run_grid(config, axes or {}, name=name, run_one=run_one, select_metric=select_metric)
    publish_grid(result)
    summary = result.to_dict()
    if any(run.status == "ok" for run in result.runs):  # tables and figures over everything stored
        summary["report"] = report_flow(config=config, options=options)["path"]
    return summary
