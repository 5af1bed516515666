"""The pipeline's stages, as one table: name, run function, version, config section and upstream inputs per row.
Everything that needs the stage list (runner, Prefect flows, CLI checks, tests) reads it here. Adding a stage is a run
function ``run_<stage>(ctx, <inputs>...) -> StageOutcome`` in its sub-package plus one :class:`Stage` row, in pipeline
order (docs/architecture.md, *Where a new thing goes*). Run functions are named ``"module:function"`` and imported when
the stage runs, so reading the table imports no stage code, and stage packages never import this module (no cycles)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from sand.pipeline.base.config import PipelineConfig
from sand.pipeline.base.errors import ConfigError
from sand.pipeline.base.store import StageOutcome
from sand.pipeline.stage_context import StageContext


@dataclass(frozen=True)
class Stage:
    name: str
    run: str  #: ``"package.module:function"``: the run function, imported on first use.
    version: str  #: Bump when the stage's code changes what it writes: old artifacts stop matching.
    section: str  #: The ``PipelineConfig`` section that configures the stage.
    inputs: Mapping[str, str] = field(default_factory=dict)  #: Run-function parameter -> upstream stage it receives.
    reads_model_features: bool = False  #: Also receives ``feature_arts``: the feature artifacts the model reads.
    model_input: bool = False  #: A model input (features, graphs): planned only when the model reads features.
    sharded: bool = False  #: Receives ``map_shards``, so a task runner (threads, processes, Dask) spreads its shards.

    @property
    def function(self) -> Callable[..., StageOutcome]:
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)

    @property
    def flow_name(self) -> str:
        return f"sand-{self.name.replace('_', '-')}"


STAGE_TABLE: tuple[Stage, ...] = (
    Stage("acquire", "sand.pipeline.acquire.stage:run_acquire", "1", "acquire"),
    Stage("interactions", "sand.pipeline.dataset.stage:run_interactions", "2", "interactions",
          inputs={"raw": "acquire"}),
    Stage("text_features", "sand.pipeline.features.text_stage:run_text_features", "1", "text_features",
          inputs={"inter": "interactions"}, model_input=True, sharded=True),
    Stage("image_features", "sand.pipeline.features.image_stage:run_image_features", "2", "image_features",
          inputs={"inter": "interactions"}, model_input=True, sharded=True),
    Stage("graphs", "sand.pipeline.features.graph_stage:run_graphs", "1", "graphs",
          inputs={"text": "text_features", "image": "image_features"}, model_input=True),
    Stage("train", "sand.pipeline.training.stage:run_train", "1", "train",
          inputs={"inter": "interactions"}, reads_model_features=True),
    Stage("evaluate", "sand.pipeline.training.stage:run_evaluate", "1", "evaluate",
          inputs={"inter": "interactions", "trained": "train"}, reads_model_features=True),
    # The report reads every evaluated run in the store, not one upstream chain.
    Stage("report", "sand.pipeline.experiments.report_stage:run_report", "1", "report"),
)

STAGES: Mapping[str, Stage] = MappingProxyType({s.name: s for s in STAGE_TABLE})
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)
STAGE_VERSIONS: Mapping[str, str] = MappingProxyType({s.name: s.version for s in STAGE_TABLE})
MODEL_INPUT_STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_TABLE if s.model_input)


def stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}: choose one of {', '.join(STAGE_NAMES)}")
    return STAGES[name]


def check_stage_names(names: Iterable[str | None]) -> None:
    """Fail on the first unknown name (``--until``, ``--refresh``, ``sand stage NAME``); ``None`` passes."""
    for name in (n for n in names if n is not None):
        stage(name)


class Context(StageContext):
    """A :class:`StageContext` whose stage versions are this table's."""

    @classmethod
    def create(cls, cfg: PipelineConfig, refresh: Sequence[str] = (),  # type: ignore[override]  # versions: the table's
               progress: bool = True) -> Context:
        return super().create(cfg, STAGE_VERSIONS, refresh, progress)  # type: ignore[return-value]
