"""One retrain, start to finish: new data? train a challenger, compare, promote, publish.

Why without Prefect: the CLI, the deployment and the tests share these decisions; the caller supplies only how the
pipeline runs. Source states are saved last, so a failed retrain is retried in full."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sand.pipeline.acquire.sources import resolve_source
from sand.pipeline.base.config import PipelineConfig
from sand.pipeline.base.store import Artifact, ArtifactStore
from sand.pipeline.serving.changes import ChangeReport, detect_changes, remote_revision, source_locations
from sand.pipeline.serving.compare import compare_on_shared, promotion_verdict, shared_split
from sand.pipeline.serving.publish import publish, published_dir, top_k_table
from sand.pipeline.serving.registry import Decision, ModelEntry, ModelRegistry, Record, now
from sand.pipeline.serving.runs import entry_artifacts, entry_for_run, entry_train_config, run_embeddings

log = logging.getLogger(__name__)


@dataclass
class RetrainReport(Record):
    """What one retrain did; ``status`` is ``no new data`` or ``retrained``."""

    status: str
    message: str
    dataset: str
    model: str
    changes: list[str] = field(default_factory=list)
    challenger: str | None = None
    registered: bool = False
    decision: dict[str, Any] | None = None
    published: dict[str, Any] | None = None


@dataclass(frozen=True)
class Survey:
    """Before a retrain: the dataset's name, what changed since the last one, the champion in use."""

    cfg: PipelineConfig
    registry: ModelRegistry
    dataset: str
    changes: ChangeReport
    champion: ModelEntry | None

    def unchanged(self) -> RetrainReport | None:
        """The whole retrain's report when there is nothing to do: no new data and a champion in use."""
        if self.changes.changed or self.champion is None:
            return None
        model = self.cfg.train.model
        message = f"{self.changes.message()}; {model} champion {self.champion.key} stays in use"
        return RetrainReport("no new data", message, self.dataset, model)


def survey(cfg: PipelineConfig) -> Survey:
    """Probe the sources against their states at the last finished retrain of this dataset and model."""
    data_root = Path(cfg.data_root).expanduser().resolve()
    cfg = cfg.model_copy(update={"data_root": data_root})
    registry = ModelRegistry(data_root)
    acfg = cfg.acquire
    spec = resolve_source(acfg.dataset, acfg.format, acfg.reviews, acfg.meta)
    previous = registry.source_states(spec.name, cfg.train.model)
    changes = detect_changes(source_locations(spec, acfg), previous, timeout=acfg.timeout)
    return Survey(cfg, registry, spec.name, changes, registry.champion(spec.name, cfg.train.model))


def publish_model(data_root: Path, entry: ModelEntry, k: int) -> dict[str, Any]:
    """Publish ``entry``'s top ``k`` for every user of its snapshot under ``<data-root>/published/<dataset>/``."""
    artifacts = entry_artifacts(ArtifactStore(data_root), entry)
    table = top_k_table(artifacts["interactions"], *run_embeddings(entry_train_config(entry), artifacts), k)
    manifest = {"model_key": entry.key, "dataset": entry.dataset, "model": entry.model, "snapshot": entry.snapshot,
                "metrics": entry.metrics, "k": k, "published_at": now()}
    return publish(published_dir(data_root, entry.dataset), table, manifest)


def challenge(store: ArtifactStore, challenger: ModelEntry, champion: ModelEntry | None,
              metric: str, max_drop: float) -> Decision:
    """The decision for ``challenger`` against ``champion`` on the challenger's snapshot (see compare.py)."""
    if champion is None:
        return Decision(challenger.dataset, challenger.model, challenger.key, None, True,
                        {"reason": "no champion yet: the first model is promoted", "metric": metric}, now())
    new_arts, old_arts = entry_artifacts(store, challenger), entry_artifacts(store, champion)
    shared = shared_split(new_arts["interactions"], old_arts["interactions"])
    _, new_u, new_i = run_embeddings(entry_train_config(challenger), new_arts)
    _, old_u, old_i = run_embeddings(entry_train_config(champion), old_arts)
    details = compare_on_shared(shared, (new_u, new_i), (old_u, old_i), metric)
    promoted, reason = promotion_verdict(details, max_drop)
    details.update(reason=reason, max_drop=max_drop)
    return Decision(challenger.dataset, challenger.model, challenger.key, champion.key, promoted, details, now())


def retrain_once(cfg: PipelineConfig, run: Callable[[PipelineConfig], Mapping[str, Artifact]]) -> RetrainReport:
    """Steps 1 to 4 of a scheduled retrain; ``run(cfg)`` runs the pipeline up to ``evaluate``: stage -> artifact."""
    found = survey(cfg)
    cfg, registry, dataset, changes, champion = found.cfg, found.registry, found.dataset, found.changes, found.champion
    model, data_root = cfg.train.model, cfg.data_root
    if (early := found.unchanged()) is not None:
        log.info("retrain: %s", early.message)
        return early
    log.info("retrain: %s", changes.message() if changes.changed else f"no {model} champion yet")
    if (revision := remote_revision(changes.states)) is not None:
        cfg = cfg.model_copy(update={"acquire": cfg.acquire.model_copy(update={"revision": revision})})
    if cfg.retrain.warm_start and champion is not None:
        cfg = cfg.model_copy(update={"retrain": cfg.retrain.model_copy(update={"warm_start_from": champion.key})})
    entry = entry_for_run(cfg, run(cfg))
    registered = registry.register(entry)
    if champion is not None and champion.key == entry.key:
        decision = None  # the same training on the same snapshot: nothing to compare
        message = f"retrained: model {entry.key} is the champion already"
    else:
        made = challenge(ArtifactStore(data_root), entry, champion, cfg.retrain.metric, cfg.retrain.max_drop)
        registry.decide(made)
        decision = made.to_dict()
        message = f"retrained: {made.details['reason']}"
    current = registry.champion(dataset, model)
    published = publish_model(data_root, current, cfg.retrain.top_k) if current is not None else None
    registry.save_source_states(dataset, model, changes.states)
    log.info("retrain: %s", message)
    return RetrainReport("retrained", message, dataset, model, changes.reasons, entry.key, registered,
                         decision, published)


def promote_by_hand(data_root: Path, key: str, k: int) -> tuple[Decision, dict[str, Any]]:
    """Make the registered model ``key`` its (dataset, model)'s champion (a rollback, say) and republish."""
    registry = ModelRegistry(data_root)
    entry = registry.get(key)
    previous = registry.champion(entry.dataset, entry.model)
    decision = Decision(entry.dataset, entry.model, entry.key, previous.key if previous else None, True,
                        {"reason": "promoted by hand (sand models promote)"}, now())
    registry.decide(decision)
    return decision, publish_model(Path(data_root), entry, k)
