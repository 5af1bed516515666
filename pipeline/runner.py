"""The one loop over the stage table: which stages, in which order, with which inputs. Why one loop: a Prefect run, a
fully cached run, a single stage, a grid and ``sand.run`` in a notebook all need the same answer; the Prefect layer
(``flows/pipeline_flows.py``) only supplies ``call``, which runs each stage in its own sub-flow."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sand.models.registry import required_modalities
from sand.pipeline.base.config import PipelineConfig
from sand.pipeline.base.errors import StageError
from sand.pipeline.base.store import Artifact, StageOutcome
from sand.pipeline.experiments.grid import GridResult, run_grid
from sand.pipeline.stage_context import NotCached, ShardMapper, StageContext
from sand.pipeline.stages import MODEL_INPUT_STAGES, STAGE_TABLE, Context, Stage, stage

#: ``call(stage_name, done)`` runs one stage given the outcomes before it (default: :func:`run_stage`).
StageCaller = Callable[[str, Mapping[str, StageOutcome]], StageOutcome]


def planned_stages(cfg: PipelineConfig, until: str | None = None) -> list[str]:
    """Stages to run, in table order, up to ``until``; ID-only models skip the model-input stages."""
    last = STAGE_TABLE.index(stage(until)) if until else len(STAGE_TABLE) - 1
    plan = [s.name for s in STAGE_TABLE[: last + 1]]
    if until not in MODEL_INPUT_STAGES and not required_modalities(cfg.train.model):
        plan = [s for s in plan if s not in MODEL_INPUT_STAGES]
    return plan


def direct_upstream(cfg: PipelineConfig, name: str) -> list[str]:
    row = stage(name)
    wanted = set(row.inputs.values())
    if row.reads_model_features and required_modalities(cfg.train.model):
        wanted.update(MODEL_INPUT_STAGES)
    return [s.name for s in STAGE_TABLE if s.name in wanted]


def upstream_stages(cfg: PipelineConfig, name: str) -> list[str]:
    """Every stage ``name`` depends on, directly or not, in table order."""
    needed = {s for direct in direct_upstream(cfg, name) for s in (direct, *upstream_stages(cfg, direct))}
    return [s.name for s in STAGE_TABLE if s.name in needed]


@dataclass
class PipelineResult:
    outcomes: dict[str, StageOutcome] = field(default_factory=dict)

    def artifact(self, stage_name: str) -> Artifact:
        return self.outcomes[stage_name].artifact

    def artifacts(self) -> dict[str, Artifact]:
        return {name: outcome.artifact for name, outcome in self.outcomes.items()}

    def summary(self) -> dict[str, Any]:
        """The ``--json`` object: dataset statistics, per-stage timings/caching, metrics."""
        out: dict[str, Any] = {"stages": {s: o.summary() for s, o in self.outcomes.items()}}
        for key, name, entry in (("dataset", "interactions", "stats"), ("train", "train", "result"),
                                 ("metrics", "evaluate", "metrics")):
            if name in self.outcomes:
                out[key] = self.artifact(name).manifest.get(entry, {})
        if "report" in self.outcomes:
            out["report"] = str(self.artifact("report").path)
        return out


def stage_arguments(ctx: StageContext, row: Stage, upstream: Mapping[str, Artifact],
                    map_shards: ShardMapper | None = None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {param: upstream[source] for param, source in row.inputs.items()}
    if row.reads_model_features:
        reads = required_modalities(ctx.cfg.train.model)
        kwargs["feature_arts"] = {n: upstream[n] for n in MODEL_INPUT_STAGES if reads and n in upstream}
    if row.sharded:
        kwargs["map_shards"] = map_shards
    return kwargs


def run_stage(ctx: StageContext, stage_name: str, done: Mapping[str, StageOutcome],
              map_shards: ShardMapper | None = None) -> StageOutcome:
    """Run one stage given the outcomes of (at least) the stages it reads."""
    row = stage(stage_name)
    upstream = {name: outcome.artifact for name, outcome in done.items()}
    missing = [s for s in direct_upstream(ctx.cfg, stage_name) if s not in upstream]
    if missing:
        raise StageError(f"stage {stage_name!r} needs the outcome of {', '.join(missing)} first")
    return row.function(ctx, **stage_arguments(ctx, row, upstream, map_shards))


def run_stages(ctx: StageContext, names: Sequence[str], call: StageCaller | None = None,
               done: Mapping[str, StageOutcome] | None = None) -> PipelineResult:
    """The loop: run (or reuse) ``names`` in order, each given ``done`` and the outcomes before it; the result holds
    ``names`` only. ``call`` decides how one stage runs (default :func:`run_stage`; the Prefect flow: in a sub-flow)."""
    call = call or functools.partial(run_stage, ctx)
    seen = dict(done or {})
    result = PipelineResult()
    for name in names:
        result.outcomes[name] = seen[name] = call(name, dict(seen))
    return result


def run_pipeline(ctx: StageContext, until: str | None = None, call: StageCaller | None = None) -> PipelineResult:
    return run_stages(ctx, planned_stages(ctx.cfg, until), call)


def resolve_upstream(ctx: StageContext, stage_name: str) -> dict[str, StageOutcome]:
    """Outcomes of every stage ``stage_name`` depends on, built if missing but never refreshed (``--refresh`` is for
    it)."""
    return run_stages(dataclasses.replace(ctx, refresh=frozenset()), upstream_stages(ctx.cfg, stage_name)).outcomes


def run_one_stage(ctx: StageContext, stage_name: str) -> PipelineResult:
    """One stage (its upstream found or built first); the result holds that stage only."""
    return run_stages(ctx, [stage_name], done=resolve_upstream(ctx, stage_name))


def from_store(ctx: StageContext, until: str | None = None, stage_name: str | None = None) -> PipelineResult | None:
    """The run's result (the pipeline up to ``until``, or one stage) when all it needs is in the store, else ``None``.
    Why: a fully cached run then skips Prefect, whose API server and per-stage flow runs cost most of a warm run."""
    if ctx.refresh:
        return None
    lookup = dataclasses.replace(ctx, cache_only=True)
    try:
        return run_pipeline(lookup, until) if stage_name is None else run_one_stage(lookup, stage_name)
    except NotCached:
        return None


def run_grid_locally(base: PipelineConfig, axes: Mapping[str, Sequence[Any]], *, name: str,
                     select_metric: str = "recall@20") -> GridResult:
    """A grid in this process (no Prefect): each combination is the pipeline up to ``evaluate``."""
    return run_grid(base, axes, name=name, select_metric=select_metric,
                    run_one=lambda cfg: run_pipeline(Context.create(cfg), until="evaluate").summary())
