"""The ``text_features`` stage: one sentence-transformer vector per item, encoded in shards."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from sand.pipeline.base.errors import StageError
from sand.pipeline.base.store import Artifact, StageOutcome
from sand.pipeline.features.imported import copy_imported, imported_feature, missing_feature_message
from sand.pipeline.features.text import assemble_text_features, item_text, plan_text_shards, run_text_shard
from sand.pipeline.stage_context import PERFORMANCE_FIELDS, ShardMapper, StageContext, dataset_counts, key_params

log = logging.getLogger(__name__)

#: Text settings that change speed, or only the last float bits (documented): not in the key.
TEXT_PERFORMANCE_FIELDS = PERFORMANCE_FIELDS | {"shard_size", "threads"}


def _map_text_locally(fn: Callable[..., Any], jobs: Sequence[Any]) -> list[Any]:
    # disable=None: tqdm draws the bar only when stderr is a terminal
    return [fn(job) for job in tqdm(jobs, desc="text shards", disable=True if len(jobs) < 2 else None)]


def run_text_features(ctx: StageContext, inter: Artifact, map_shards: ShardMapper | None = None) -> StageOutcome:
    """Item texts -> ``text_feat.npy`` as shard jobs over ``map_shards`` (default: in this process), the same bytes
    whatever the runner, shard size or resume (see :mod:`pipeline.features.text`)."""
    tcfg = ctx.cfg.text_features
    imported = imported_feature(inter, "text_feat.npy")
    if imported:
        params: dict[str, Any] = {"imported": str(imported)}
    else:
        import torch  # lazy: torch takes seconds to import

        # sentence-transformers picks MPS by itself where present; the thread count changes the vectors' last bits,
        # so the count the shards will pin is part of the key
        params = key_params(tcfg, TEXT_PERFORMANCE_FIELDS, allow_mps=True)
        params["threads"] = tcfg.threads or torch.get_num_threads()

    def build(out: Path) -> dict[str, Any]:
        _, n_items = dataset_counts(inter)
        if imported:
            return copy_imported(imported, out, "text_feat.npy", n_items)
        items = pd.read_parquet(inter.file("items.parquet"))
        if "title" not in items.columns or not items.get("has_meta", pd.Series([True])).any():
            raise StageError(missing_feature_message(ctx, inter, "text", "item text"))
        items = items.sort_values("item")
        texts = [item_text(r.title, r.brand, r.categories, r.description) for r in items.itertuples(index=False)]
        threads = params["threads"]
        bits = {**params, "batch_size": tcfg.batch_size, "device": tcfg.device}
        work = ctx.store.work_dir("text_features", ctx.work_key("text_features", bits, {"interactions": inter}))
        # Vectors depend on the batch (padding), the device and the thread count: each has its own per-item cache.
        cache = ctx.store.cache_dir("text") / f"batch{tcfg.batch_size}-{params['device']}-threads{threads}"
        uniq, jobs, stats = plan_text_shards(texts, tcfg.model, batch_size=tcfg.batch_size, device=tcfg.device,
                                             threads=threads, cache_dir=cache, shard_size=tcfg.shard_size,
                                             work_dir=work)
        paths = (map_shards or _map_text_locally)(run_text_shard, jobs)
        shape = assemble_text_features(uniq, paths, out / "text_feat.npy")
        shutil.rmtree(work, ignore_errors=True)
        log.info("text features: %d texts (%d unique), %d from cache, %d encoded in %d shards",
                 stats.n_texts, stats.n_unique, stats.n_cached, stats.n_encoded, len(jobs))
        return {"source": "encoded", "model": tcfg.model, "recipe": "title + brand + first category path + "
                "description", "shape": list(shape), "encoding": asdict(stats), "shards": len(jobs),
                "threads": threads, "batch_size": tcfg.batch_size}

    return ctx.run("text_features", params, {"interactions": inter}, build)
