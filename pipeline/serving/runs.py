"""A registered model's artifacts and embeddings, and the entry a finished pipeline run registers as: promotion,
publication and ``sand recommend`` all rebuild a model from the artifacts its registry entry names."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sand.pipeline.acquire.sources import resolve_source
from sand.pipeline.base.config import PipelineConfig, TrainConfig
from sand.pipeline.base.errors import StageError
from sand.pipeline.base.store import Artifact, ArtifactStore
from sand.pipeline.serving.registry import ModelEntry, ModelRegistry, now
from sand.pipeline.training.model_io import trained_embeddings

#: Stages whose artifacts a registered model is rebuilt from (those the run had).
MODEL_STAGES = ("acquire", "interactions", "text_features", "image_features", "graphs", "train", "evaluate")
FEATURE_STAGES = ("text_features", "image_features", "graphs")


def dataset_name(cfg: PipelineConfig) -> str:
    """The dataset's name as the acquire stage records it (``sample``, ``Baby``, a folder's name)."""
    acfg = cfg.acquire
    return resolve_source(acfg.dataset, acfg.format, acfg.reviews, acfg.meta).name


def entry_for_run(cfg: PipelineConfig, artifacts: Mapping[str, Artifact]) -> ModelEntry:
    if missing := [s for s in ("acquire", "interactions", "train", "evaluate") if s not in artifacts]:
        raise StageError(f"cannot register a run without its {', '.join(missing)} artifact(s)")
    return ModelEntry(
        key=artifacts["train"].key, dataset=str(artifacts["interactions"].manifest.get("name") or dataset_name(cfg)),
        model=cfg.train.model, snapshot=artifacts["acquire"].key,
        artifacts={s: artifacts[s].key for s in MODEL_STAGES if s in artifacts}, config=cfg.model_dump(mode="json"),
        metrics=dict(artifacts["evaluate"].manifest.get("metrics", {})), created_at=now(),
    )


def entry_artifacts(store: ArtifactStore, entry: ModelEntry) -> dict[str, Artifact]:
    """Stage -> artifact of a registered model; one line naming what is gone from the store."""
    found = {}
    for stage, key in entry.artifacts.items():
        art = store.lookup(stage, key)
        if art is None:
            raise StageError(f"model {entry.key}: its {stage} artifact {key} is no longer in {store.root}")
        found[stage] = art
    return found


def entry_train_config(entry: ModelEntry) -> TrainConfig:
    return PipelineConfig.model_validate(entry.config).train


def run_embeddings(tcfg: TrainConfig, artifacts: Mapping[str, Artifact]) -> tuple[Any, Any, Any]:
    """(SplitData, user embeddings, item embeddings) of a run's best checkpoint."""
    features = {s: artifacts[s] for s in FEATURE_STAGES if s in artifacts}
    return trained_embeddings(tcfg, artifacts["interactions"], artifacts["train"], features)


def champion_run(cfg: PipelineConfig) -> tuple[str, TrainConfig, dict[str, Artifact]] | None:
    """(key, train config, artifacts) of the registered champion of ``cfg``'s dataset and model, if any."""
    root = Path(cfg.data_root).expanduser().resolve()
    entry = ModelRegistry(root).champion(dataset_name(cfg), cfg.train.model)
    if entry is None:
        return None
    return entry.key, entry_train_config(entry), entry_artifacts(ArtifactStore(root), entry)
