"""The stage graph, in one place, for every way of running the pipeline.

Why: ``sand run`` (through Prefect), a single stage flow, a grid of training
runs and a notebook all need the same answer to "which stages, in which
order, with which inputs". The Prefect layer only supplies ``call`` (to wrap
each stage in its own sub-flow) and ``map_shards`` (to spread image and text shards over
a task runner).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sand.pipeline import stages
from sand.pipeline.config import STAGES
from sand.pipeline.errors import ConfigError
from sand.pipeline.store import Artifact, StageOutcome

FEATURE_STAGES = ("text_features", "image_features", "graphs")
#: ``call(stage_name, function, *args)`` runs one stage; the default just calls it.
StageCaller = Callable[..., StageOutcome]


def _direct(stage: str, fn: Callable[..., StageOutcome], *args: Any) -> StageOutcome:
    return fn(*args)


def model_needs_features(model_name: str) -> bool:
    from sand.models.registry import required_modalities

    return bool(required_modalities(model_name))


def planned_stages(cfg, until: str | None = None) -> list[str]:
    """Stages to run, in order, up to ``until``; ID-only models skip the feature stages."""
    if until is not None and until not in STAGES:
        raise ConfigError(f"unknown stage {until!r}: choose one of {', '.join(STAGES)}")
    last = STAGES.index(until) if until else len(STAGES) - 1
    plan = list(STAGES[: last + 1])
    if not model_needs_features(cfg.train.model) and until not in FEATURE_STAGES:
        plan = [s for s in plan if s not in FEATURE_STAGES]
    return plan


@dataclass
class PipelineResult:
    outcomes: dict[str, StageOutcome] = field(default_factory=dict)

    def artifact(self, stage: str) -> Artifact:
        return self.outcomes[stage].artifact

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


def run_stage(
    ctx: stages.Context, stage: str, done: dict[str, StageOutcome], map_shards: stages.ShardMapper | None = None
) -> StageOutcome:
    """Run one stage given the outcomes of the stages before it."""
    art = {name: o.artifact for name, o in done.items()}
    features = {k: art[k] for k in FEATURE_STAGES if k in art and model_needs_features(ctx.cfg.train.model)}
    if stage == "acquire":
        return stages.run_acquire(ctx)
    if stage == "interactions":
        return stages.run_interactions(ctx, art["acquire"])
    if stage == "text_features":
        return stages.run_text_features(ctx, art["interactions"], map_shards)
    if stage == "image_features":
        return stages.run_image_features(ctx, art["interactions"], map_shards)
    if stage == "graphs":
        return stages.run_graphs(ctx, art["text_features"], art["image_features"])
    if stage == "train":
        return stages.run_train(ctx, art["interactions"], features)
    if stage == "evaluate":
        return stages.run_evaluate(ctx, art["interactions"], art["train"], features)
    if stage == "report":
        return stages.run_report(ctx)
    raise ConfigError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")


def run_pipeline(
    ctx: stages.Context,
    until: str | None = None,
    call: StageCaller = _direct,
    map_shards: stages.ShardMapper | None = None,
) -> PipelineResult:
    """Run (or reuse) every planned stage in order."""
    result = PipelineResult()
    for stage in planned_stages(ctx.cfg, until):
        result.outcomes[stage] = call(stage, run_stage, ctx, stage, dict(result.outcomes), map_shards)
    return result


def resolve_upstream(ctx: stages.Context, stage: str) -> dict[str, StageOutcome]:
    """Outcomes of the stages ``stage`` reads, built if missing but never refreshed.

    A single-stage run (``sand stage train``) uses this so that ``--refresh`` applies to
    the named stage only, and an upstream stage run moments ago is simply found again.
    """
    plan = planned_stages(ctx.cfg, stage)
    calm = dataclasses.replace(ctx, refresh=frozenset())
    done: dict[str, StageOutcome] = {}
    for upstream in plan[:-1]:
        done[upstream] = run_stage(calm, upstream, done)
    return done
