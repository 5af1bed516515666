"""The one loop over the stage table: which stages, in which order, with which inputs.

Why one loop: ``sand run`` (through Prefect), a fully cached ``sand run`` (answered from the store), a single stage, a
grid of training runs and ``sand.run`` in a notebook all need the same answer, and :func:`run_stages` gives it from the
table in ``pipeline/stages.py``. The Prefect layer (``flows/pipeline_flows.py``) only supplies ``call``, which runs each
stage in its own sub-flow (with a task runner spreading the image and text shards); everything else is this module's."""

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


def model_needs_features(model_name: str) -> bool:
    return bool(required_modalities(model_name))


def planned_stages(cfg: PipelineConfig, until: str | None = None) -> list[str]:
    """Stages to run, in table order, up to ``until``; ID-only models skip the model-input stages."""
    last = STAGE_TABLE.index(stage(until)) if until else len(STAGE_TABLE) - 1
    plan = [s.name for s in STAGE_TABLE[: last + 1]]
    if until not in MODEL_INPUT_STAGES and not model_needs_features(cfg.train.model):
        plan = [s for s in plan if s not in MODEL_INPUT_STAGES]
    return plan


def direct_upstream(cfg: PipelineConfig, name: str) -> list[str]:
    """The stages whose artifacts ``name`` receives, in table order."""
    row = stage(name)
    wanted = set(row.inputs.values())
    if row.reads_model_features and model_needs_features(cfg.train.model):
        wanted.update(MODEL_INPUT_STAGES)
    return [s.name for s in STAGE_TABLE if s.name in wanted]


def upstream_stages(cfg: PipelineConfig, name: str) -> list[str]:
    """Every stage ``name`` depends on, directly or not, in table order."""
    needed: set[str] = set()
    todo = direct_upstream(cfg, name)
    while todo:
        current = todo.pop()
        if current not in needed:
            needed.add(current)
            todo.extend(direct_upstream(cfg, current))
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
        if "interactions" in self.outcomes:
            out["dataset"] = self.artifact("interactions").manifest.get("stats", {})
        if "train" in self.outcomes:
            out["train"] = self.artifact("train").manifest.get("result", {})
        if "evaluate" in self.outcomes:
            out["metrics"] = self.artifact("evaluate").manifest.get("metrics", {})
        if "report" in self.outcomes:
            out["report"] = str(self.artifact("report").path)
        return out


def stage_arguments(
    ctx: StageContext, row: Stage, upstream: Mapping[str, Artifact], map_shards: ShardMapper | None = None
) -> dict[str, Any]:
    """The run function's keyword arguments, from its row and the upstream artifacts."""
    kwargs: dict[str, Any] = {param: upstream[source] for param, source in row.inputs.items()}
    if row.reads_model_features:
        reads = model_needs_features(ctx.cfg.train.model)
        kwargs["feature_arts"] = {n: upstream[n] for n in MODEL_INPUT_STAGES if reads and n in upstream}
    if row.sharded:
        kwargs["map_shards"] = map_shards
    return kwargs


def run_stage(
    ctx: StageContext, stage_name: str, done: Mapping[str, StageOutcome], map_shards: ShardMapper | None = None
) -> StageOutcome:
    """Run one stage given the outcomes of (at least) the stages it reads."""
    row = stage(stage_name)
    upstream = {name: outcome.artifact for name, outcome in done.items()}
    missing = [s for s in direct_upstream(ctx.cfg, stage_name) if s not in upstream]
    if missing:
        raise StageError(f"stage {stage_name!r} needs the outcome of {', '.join(missing)} first")
    return row.function(ctx, **stage_arguments(ctx, row, upstream, map_shards))


def run_stages(
    ctx: StageContext, names: Sequence[str], call: StageCaller | None = None,
    done: Mapping[str, StageOutcome] | None = None,
) -> PipelineResult:
    """The loop: run (or reuse) ``names`` in order, each given ``done`` and the outcomes before it.

    The result holds the outcomes of ``names`` only; ``call`` decides how one stage runs (default: here,
    :func:`run_stage`; the Prefect flow: in the stage's sub-flow)."""
    call = call or functools.partial(run_stage, ctx)
    seen = dict(done or {})
    result = PipelineResult()
    for name in names:
        result.outcomes[name] = seen[name] = call(name, dict(seen))
    return result


def run_pipeline(ctx: StageContext, until: str | None = None, call: StageCaller | None = None) -> PipelineResult:
    """Run (or reuse) every planned stage in order."""
    return run_stages(ctx, planned_stages(ctx.cfg, until), call)


def resolve_upstream(ctx: StageContext, stage_name: str) -> dict[str, StageOutcome]:
    """Outcomes of every stage ``stage_name`` depends on, built if missing but never refreshed.

    A single-stage run (``sand stage train``) uses this so that ``--refresh`` applies to the named stage only, and an
    upstream stage run moments ago is simply found again."""
    calm = dataclasses.replace(ctx, refresh=frozenset())
    return run_stages(calm, upstream_stages(ctx.cfg, stage_name)).outcomes


def run_one_stage(ctx: StageContext, stage_name: str) -> PipelineResult:
    """One stage (its upstream found or built first); the result holds that stage only."""
    return run_stages(ctx, [stage_name], done=resolve_upstream(ctx, stage_name))


def from_store(ctx: StageContext, until: str | None = None, stage_name: str | None = None) -> PipelineResult | None:
    """The result of the run (the pipeline up to ``until``, or one stage) when every stage it needs is in the store;
    ``None`` when one must be built (or ``ctx.refresh`` asks for work).

    Why: a fully cached run has nothing to orchestrate, and starting Prefect's API server and one flow run per stage
    cost most of a warm run (about 45 s of 48 s on a Baby-sized dataset); the caller starts Prefect only when this
    returns ``None``."""
    if ctx.refresh:
        return None
    lookup = dataclasses.replace(ctx, cache_only=True)
    try:
        return run_pipeline(lookup, until) if stage_name is None else run_one_stage(lookup, stage_name)
    except NotCached:
        return None


def run_grid_locally(
    base: PipelineConfig, axes: Mapping[str, Sequence[Any]], *, name: str, select_metric: str = "recall@20"
) -> GridResult:
    """A grid in this process (no Prefect): each combination is the pipeline up to ``evaluate``."""

    def run_one(cfg: PipelineConfig) -> dict[str, Any]:
        return run_pipeline(Context.create(cfg), until="evaluate").summary()

    return run_grid(base, axes, name=name, run_one=run_one, select_metric=select_metric)
