"""What the Prefect UI shows about a run: table and markdown artifacts. Why: "how did last night's retraining do"
should be answered on the flow run's page (dataset statistics, metrics per split and K, training curves, the report's
figures) without opening the data root."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from sand.pipeline.base.store import StageOutcome

log = logging.getLogger(__name__)


def _safe(publish) -> None:
    """UI artifacts are a view: failing to publish one must not fail the pipeline."""
    try:
        publish()
    except Exception as err:  # noqa: BLE001 - any API/client problem is only logged
        log.warning("could not publish a Prefect artifact: %s", err)


def _stats_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"statistic": k, "value": str(v)} for k, v in stats.items()]


def metrics_rows(metrics: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per split, one column per metric (recall@10, ndcg@20, ...)."""
    return [{"split": split, **{k: round(float(v), 5) for k, v in values.items()}} for split, values in metrics.items()]


def image_coverage_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """How much of the dataset a shipped feature file covered, and what was skipped in it."""
    return _stats_rows({
        "source": manifest.get("source"),
        "items found": manifest.get("items_found"),
        f"items filled ({manifest.get('fill')})": manifest.get("items_filled"),
        **{k.replace("_", " "): v for k, v in (manifest.get("missing_reasons") or {}).items()},
        **{f"file {k.replace('_', ' ')}": v for k, v in (manifest.get("file_stats") or {}).items()},
    })


def publish_stage_artifacts(stage: str, outcome: StageOutcome) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact  # lazy: Prefect is slow to import
    manifest = outcome.artifact.manifest
    if stage == "interactions" and "stats" in manifest:
        _safe(lambda: create_table_artifact(
            key="sand-dataset-statistics", table=_stats_rows(manifest["stats"]),
            description=f"Dataset statistics ({manifest.get('name', '')}), artifact {outcome.artifact.key}"))
    if stage == "train" and "result" in manifest:
        result = manifest["result"]
        epochs = outcome.artifact.file("epochs.csv")
        if epochs.is_file():
            table = pd.read_csv(epochs).round(5).to_dict(orient="records")
            _safe(lambda: create_table_artifact(
                key="sand-training-log", table=table,
                description=f"Per-epoch log of {result.get('model')} (best epoch {result.get('best_epoch')})"))
    if stage == "evaluate" and "metrics" in manifest:
        _safe(lambda: create_table_artifact(
            key="sand-metrics", table=metrics_rows(manifest["metrics"]),
            description=f"Full-ranking metrics of {manifest.get('model')} (MMRec protocol)"))
    if stage == "report":
        publish_figures(sorted(outcome.artifact.path.rglob("*.png")))
    if stage == "image_features" and "items_found" in manifest:
        _safe(lambda: create_table_artifact(
            key="sand-image-feature-coverage", table=image_coverage_rows(manifest),
            description=f"Image features from {manifest.get('url')}: items found in the file and filled"))
    if stage == "image_features" and manifest.get("missing"):
        _safe(lambda: create_markdown_artifact(
            key="sand-missing-images", markdown=f"**{manifest['missing']} items without a usable image** (filled with "
            f"{manifest.get('fill')}): {manifest.get('missing_reasons')}"))


def publish_summary(summary: dict[str, Any]) -> None:
    from prefect.artifacts import create_markdown_artifact  # lazy: Prefect is slow to import
    lines = ["# SAND pipeline run", "", "| stage | cached | seconds |", "|---|---|---|"]
    for stage, info in summary.get("stages", {}).items():
        lines.append(f"| {stage} | {info['cached']} | {info['seconds']:.1f} |")
    if "metrics" in summary:
        lines += ["", "| split | metric | value |", "|---|---|---|"]
        for split, values in summary["metrics"].items():
            lines += [f"| {split} | {k} | {float(v):.4f} |" for k, v in values.items()]
    _safe(lambda: create_markdown_artifact(key="sand-run-summary", markdown="\n".join(lines)))


def publish_figures(paths: list[Path], key: str = "sand-report-figures") -> None:
    """Report figures inline (data URIs), since the UI cannot read the data root."""
    from prefect.artifacts import create_markdown_artifact  # lazy: Prefect is slow to import
    parts = ["# Report figures", ""]
    for path in paths:
        data = base64.b64encode(Path(path).read_bytes()).decode()
        parts += [f"## {Path(path).stem}", f"![{Path(path).stem}](data:image/png;base64,{data})", ""]
    _safe(lambda: create_markdown_artifact(key=key, markdown="\n".join(parts)))


def publish_grid(result: Any) -> None:
    """The grid's runs table (one row per setting) and which one validation selected."""
    from prefect.artifacts import create_table_artifact  # lazy: Prefect is slow to import
    if not Path(result.table_path).is_file():
        return
    table = pd.read_csv(result.table_path).round(5).astype(object).where(lambda d: d.notna(), None)
    selected = result.selected.to_dict() if result.selected else None
    _safe(lambda: create_table_artifact(
        key=f"sand-grid-{result.name.lower().replace('_', '-').replace('.', '-')}",
        table=table.to_dict(orient="records"),
        description=f"Grid {result.name}: selected by valid {result.select_metric}: {selected}"))
