"""Prefect flows: one per stage, generated from the stage table (``pipeline/stages.py``), and the end-to-end flow, the
runner's one loop (``pipeline/runner.py``) running each stage in its flow. Why a flow per stage: a deployment and a UI
node of its own, parameterised by the validated ``PipelineConfig`` so the UI shows a form. Flows pass small references
to artifacts (paths, keys, manifests), never arrays. Caching is the artifact store's: a stage whose key exists does no
work and its flow run ends in a ``Cached`` completed state."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from prefect import Flow, flow, task, unmapped
from prefect.cache_policies import NONE as NO_CACHE
from prefect.states import Completed

from sand.flows.run_options import RunOptions, make_task_runner
from sand.flows.ui import publish_grid, publish_stage_artifacts, publish_summary
from sand.pipeline.base.config import PipelineConfig
from sand.pipeline.base.store import Artifact, StageOutcome
from sand.pipeline.experiments.grid import run_grid
from sand.pipeline.runner import PipelineResult, direct_upstream, resolve_upstream, run_pipeline, run_stage
from sand.pipeline.stage_context import ShardMapper
from sand.pipeline.stages import STAGE_TABLE, Context, Stage


def outcome_ref(outcome: StageOutcome) -> dict[str, Any]:
    """A stage outcome as a small JSON-able reference (what flows return)."""
    art = outcome.artifact
    return {"stage": art.stage, "key": art.key, "path": str(art.path), "cached": outcome.cached,
            "seconds": outcome.seconds, "manifest": art.manifest}


def outcome_from_ref(ref: dict[str, Any]) -> StageOutcome:
    art = Artifact(ref["stage"], ref["key"], Path(ref["path"]), ref["manifest"])
    return StageOutcome(art, ref["cached"], ref["seconds"])


@task(cache_policy=NO_CACHE, retries=1)
def shard_task(run_job: Callable[[Any], str], job: Any) -> str:
    """Run one shard job of a sharded stage (fetch and encode images, encode texts); returns its file path."""
    return run_job(job)


def _task_mapper(options: RunOptions, row: Stage) -> ShardMapper:
    """Map a stage's shard jobs, as ``<stage>-shard`` tasks, over the chosen task runner (threads, processes, Dask)."""
    named = shard_task.with_options(name=f"{row.flow_name.removeprefix('sand-')}-shard")

    def map_shards(run_job: Callable[[Any], str], jobs: Sequence[Any]) -> list[str]:
        with make_task_runner(options.runner, options.dask_address, options.workers) as runner:
            return [f.result() for f in runner.map(named, {"run_job": unmapped(run_job), "job": list(jobs)})]

    return map_shards


def _stage_flow(row: Stage) -> Flow[..., dict[str, Any]]:
    """The Prefect flow of one table row, named ``sand-<stage>``."""

    def run_stage_flow(config: PipelineConfig | None = None, options: RunOptions | None = None,
                       upstream: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        options = options or RunOptions()
        ctx = Context.create(config or PipelineConfig(), options.refresh, progress=options.show_progress())
        if upstream is None:  # run on its own (``sand stage``, a deployment): find or build what it reads
            done = resolve_upstream(ctx, row.name)
        else:  # inside the pipeline flow: the upstream flows' results, passed in
            done = {name: outcome_from_ref(ref) for name, ref in upstream.items()}
        outcome = run_stage(ctx, row.name, done, _task_mapper(options, row) if row.sharded else None)
        publish_stage_artifacts(row.name, outcome)
        ref = outcome_ref(outcome)
        if outcome.cached:
            return Completed(message=f"{row.name}: cached artifact {outcome.artifact.key}", name="Cached", data=ref)
        return ref

    return flow(
        run_stage_flow, name=row.flow_name, log_prints=True,
        description=f"Run the {row.name} stage (config section [{row.section}]); without ``upstream`` "
        "its inputs are reused from the artifact store or built first.")


#: One flow per row of the stage table, in pipeline order.
STAGE_FLOWS: Mapping[str, Flow[..., dict[str, Any]]] = MappingProxyType(
    {row.name: _stage_flow(row) for row in STAGE_TABLE}
)


def stage_flow_entrypoint(stage_name: str) -> str:
    """The module path a deployment loads the stage's flow from (see :func:`__getattr__`)."""
    return f"{__name__}.{stage_name}_flow"


def __getattr__(name: str) -> Flow[..., dict[str, Any]]:
    """``<stage>_flow`` for every row (``image_features_flow``...): importable names for deployments."""
    stage_name = name.removesuffix("_flow")
    if name.endswith("_flow") and stage_name in STAGE_FLOWS:
        return STAGE_FLOWS[stage_name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@flow(name="sand-pipeline", log_prints=True)
def pipeline_flow(config: PipelineConfig | None = None, options: RunOptions | None = None,
                  until: str | None = None) -> PipelineResult:
    """End to end: raw Amazon data to a trained and evaluated model. The runner's loop with each stage in its sub-flow,
    handed its upstream flows' results (small references), so no stage resolves its inputs again."""
    config = config or PipelineConfig()
    options = options or RunOptions()

    def in_stage_flow(name: str, done: Mapping[str, StageOutcome]) -> StageOutcome:
        upstream = {source: outcome_ref(done[source]) for source in direct_upstream(config, name)}
        return outcome_from_ref(STAGE_FLOWS[name](config=config, options=options, upstream=upstream))

    ctx = Context.create(config, options.refresh, progress=options.show_progress())
    result = run_pipeline(ctx, until, call=in_stage_flow)
    publish_summary(result.summary())
    return result


@flow(name="sand-grid", log_prints=True)
def grid_flow(config: PipelineConfig | None = None, axes: dict[str, list[Any]] | None = None, name: str = "grid",
              options: RunOptions | None = None, select_metric: str = "recall@20") -> dict[str, Any]:
    """Every combination of ``axes`` as a nested pipeline run; selection by validation metric."""
    config = config or PipelineConfig()
    options = options or RunOptions()

    def run_one(cfg: PipelineConfig) -> dict[str, Any]:
        return pipeline_flow(config=cfg, options=options, until="evaluate").summary()

    result = run_grid(config, axes or {}, name=name, run_one=run_one, select_metric=select_metric)
    publish_grid(result)
    summary = result.to_dict()
    if any(run.status == "ok" for run in result.runs):  # tables and figures over everything stored
        summary["report"] = STAGE_FLOWS["report"](config=config, options=options)["path"]
    return summary
