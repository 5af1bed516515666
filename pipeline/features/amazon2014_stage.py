"""The image_features stage when ``image_features.source=amazon2014``: the release's own features.

Why a module of its own: the CNN path (``image_stage``) fetches and encodes images in shards, this one keeps the
dataset's rows of one category file (:mod:`sand.pipeline.features.amazon2014`). They share only the stage name and the
output contract (``image_feat.npy`` in item order, ``missing_images.csv``); their artifact keys never coincide."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sand.pipeline.acquire.download import _local_path, fetch_file
from sand.pipeline.acquire.sources import amazon2014_image_features_url, resolve_source
from sand.pipeline.base.config import PipelineConfig
from sand.pipeline.base.errors import ConfigError
from sand.pipeline.base.store import Artifact, StageOutcome
from sand.pipeline.features.amazon2014 import read_item_features
from sand.pipeline.stage_context import StageContext, local_fingerprint

log = logging.getLogger(__name__)


def amazon2014_feature_source(cfg: PipelineConfig) -> str:
    """The feature file to read: ``image_features.amazon2014_url``, else the one of the dataset's 2014 category."""
    if cfg.image_features.amazon2014_url:
        return cfg.image_features.amazon2014_url
    acfg = cfg.acquire
    url = amazon2014_image_features_url(resolve_source(acfg.dataset, acfg.format, acfg.reviews, acfg.meta))
    if url is None:
        raise ConfigError(f"image_features.source=amazon2014: dataset {acfg.dataset!r} is not an Amazon 2014 "
                          "category, so its feature file is unknown; set image_features.amazon2014_url=URL_OR_PATH of "
                          "image_features_<Cat>.b")
    return url


def check_feature_source(cfg: PipelineConfig, stages_planned: list[str]) -> None:
    """Fail before any download if the image stage needs a 2014 feature file nobody can name (MMRec ships its own)."""
    acfg = cfg.acquire
    if (cfg.image_features.source == "amazon2014" and "image_features" in stages_planned
            and resolve_source(acfg.dataset, acfg.format, acfg.reviews, acfg.meta).format != "mmrec"):
        amazon2014_feature_source(cfg)


def run_amazon2014_image_features(ctx: StageContext, inter: Artifact) -> StageOutcome:
    """Remote feature files are downloaded like the raw dumps (resume, retry, size check, sha256); local ones are read
    in place (a multi-GB copy would buy nothing) and hashed on the way."""
    icfg = ctx.cfg.image_features
    source = amazon2014_feature_source(ctx.cfg)
    remote = source.lower().startswith(("http://", "https://"))
    params = {"source": "amazon2014", "url": source, "fingerprint": local_fingerprint(source), "fill": icfg.fill}

    def build(out: Path) -> dict[str, Any]:
        items = pd.read_parquet(inter.file("items.parquet"), columns=["item", "asin"]).sort_values("item")
        download = None
        if remote:
            rec = fetch_file(source, ctx.store.data_root / "downloads", timeout=ctx.cfg.acquire.timeout,
                             retries=ctx.cfg.acquire.retries, progress=ctx.progress)
            path, download = rec.path, rec.to_dict()
        else:
            path = _local_path(source)
        result = read_item_features(path, items["asin"].astype(str).tolist(), fill=icfg.fill,
                                    hash_file=not remote, progress=ctx.progress)
        np.save(out / "image_feat.npy", result.features)
        result.missing.to_csv(out / "missing_images.csv", index=False)
        reasons = {str(k): int(v) for k, v in result.missing["reason"].value_counts().items()}
        log.info("image_features: %d of %d items found in %s, %d filled with %s (%s)", result.items_found,
                 len(items), path.name, result.items_filled, icfg.fill, reasons or "none missing")
        return {"source": "amazon2014", "url": source, "file": str(path), "download": download,
                "file_stats": result.stats.to_dict(), "shape": list(result.features.shape),
                "items_found": result.items_found, "items_filled": result.items_filled, "fill": icfg.fill,
                "items_mean_filled": result.items_filled if icfg.fill == "mean" else 0,
                "missing": result.items_filled, "missing_reasons": reasons}

    return ctx.run("image_features", params, {"interactions": inter}, build)
