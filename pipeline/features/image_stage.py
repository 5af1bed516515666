"""The ``image_features`` stage: one CNN vector per item, fetched and encoded in shards.

With ``image_features.source=amazon2014`` the stage reads the 2014 release's own features instead
(:mod:`pipeline.features.amazon2014_stage`); an MMRec folder's ``image_feat.npy`` is used as it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from sand.pipeline.acquire.url_policy import UrlPolicy, host_and_port
from sand.pipeline.base.errors import StageError
from sand.pipeline.base.files import write_bytes_atomic
from sand.pipeline.base.store import Artifact, StageOutcome
from sand.pipeline.features.amazon2014_stage import run_amazon2014_image_features
from sand.pipeline.features.image_shards import (
    FAST_ENGINE_REVISION,
    assemble_features,
    load_shard,
    process_shard,
    save_shard,
    shard_items,
)
from sand.pipeline.features.imported import copy_imported, imported_feature, missing_feature_message
from sand.pipeline.stage_context import (
    PERFORMANCE_FIELDS,
    ShardMapper,
    StageContext,
    dataset_counts,
    jsonable,
    key_params,
    local_fingerprint,
)

# the modules that pull in torch: imported inside the functions that use them, so `sand --help` stays fast.

log = logging.getLogger(__name__)


def image_settings(ctx: StageContext, inter: Artifact) -> dict[str, Any]:
    """Image stage parameters with dataset-dependent defaults filled in. The bundled sample defaults to a small random
    resnet18 because pretrained weights cannot be downloaded offline; real datasets default to ImageNet resnet50."""
    icfg = ctx.cfg.image_features
    is_sample = ctx.cfg.acquire.dataset == "sample"
    weights = icfg.weights
    if weights == "auto":
        weights = "random" if is_sample else "imagenet"
    # amazon2014-only fields; engine and precision enter below, resolved
    params = key_params(icfg, PERFORMANCE_FIELDS | {"source", "amazon2014_url", "engine", "precision"})
    params.update(backbone=icfg.backbone or ("resnet18" if is_sample else "resnet50"), weights=weights,
                  image_size=icfg.image_size or (64 if is_sample else 224))
    if weights not in ("random", "imagenet"):
        params["weights_fingerprint"] = local_fingerprint(weights)
    precision = encoder_precision(icfg.precision, icfg.device)
    if icfg.engine != "eager" or precision != "fp32":
        # Why conditional: eager float32 is what the stage computed before these settings existed, and its artifacts
        # keep their keys; any other choice changes the bytes.
        params.update(engine=icfg.engine, precision=precision)
        if icfg.engine == "fast":
            params["fast_revision"] = FAST_ENGINE_REVISION
    return params


def encoder_precision(requested: str, device: str | None) -> str:
    """``image_features.precision`` resolved on the stage's device (auto: bf16 only where it is native)."""
    from sand.pipeline.base.devices import resolve_device
    from sand.pipeline.base.hardware import resolve_precision

    return resolve_precision(requested, resolve_device(device), setting="image_features.precision")


def image_url_origin(inter: Artifact) -> str:
    """``network`` when the metadata naming the image URLs was downloaded, else ``local``. Trust follows origin: the
    acquire artifact records the sources the user gave (``params``); the bundled sample, MMRec folders and local files
    or ``file://`` sources are the user's own, anything fetched over http(s) is not."""
    raw = Path(inter.manifest["inputs"]["raw"]["path"])
    try:
        params = json.loads((raw / "manifest.json").read_text())["params"]
    except (OSError, KeyError, json.JSONDecodeError):
        return "network"  # unknown provenance: the safe assumption
    if params.get("format") in ("sample", "mmrec"):
        return "local"
    meta = params.get("meta")
    if meta is None:
        return "local"  # no metadata file: the image URLs can only come from a local folder
    return "network" if host_and_port(str(meta)) is not None else "local"


def _stage_cnn(work: Path, shared: Path, backbone: str, weights: str, seed: int,
               reuse: bool = True) -> tuple[Path, str]:
    """Build the stage's CNN once and save it where every shard (thread, process, Dask worker) loads it. Why: shards
    building their own random CNN would each draw from a racing RNG (different features per shard and run); one file,
    loaded with ``weights_only=True``, gives every shard the same bytes. Random and ImageNet CNNs depend on nothing but
    (backbone, weights, seed), so they are kept in ``shared`` for the next snapshot (``reuse=False``, a refresh: built
    again); a weights file is rebuilt into ``work``."""
    from sand.pipeline.features.image_encoder import build_cnn, save_cnn

    if weights in ("random", "imagenet"):
        name = f"{backbone}-{weights}" + (f"-seed{seed}" if weights == "random" else "")
        path, about = shared / f"{name}.pt", shared / f"{name}.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            if reuse and path.is_file():
                description = json.loads(about.read_text())["description"]
                for used in (path, about):  # in use: not for `sand cache prune`
                    os.utime(used)
                return path, description
    else:
        path, about = work / "cnn.pt", None
    model, _, description = build_cnn(backbone, weights, seed)
    save_cnn(model, path)
    if about is not None:
        write_bytes_atomic(about, json.dumps({"description": description}).encode())
    return path, description


def _torch_threads() -> int:
    """The intra-op thread count every shard pins: torch's own default here (the machine's cores)."""
    import torch

    return torch.get_num_threads()


def run_image_shard_job(args: tuple[Any, ...]) -> str:
    """One picklable shard job (runs in a thread, a process or on a Dask worker)."""
    item_ids, urls, cache_dir, fetch_kwargs, encoder_kwargs, features_cache, read_cache, out_path = args
    out_path = Path(out_path)
    if out_path.exists():  # finished by an earlier, interrupted run
        return str(out_path)
    result = process_shard(item_ids, urls, Path(cache_dir), fetch_kwargs, encoder_kwargs,
                           feature_cache=Path(features_cache), read_cache=read_cache)
    save_shard(result, out_path)
    return str(out_path)


def _map_locally(fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]]) -> list[Any]:
    # disable=None: tqdm draws the bar only when stderr is a terminal
    return [fn(job) for job in tqdm(jobs, desc="image shards", disable=True if len(jobs) < 2 else None)]


def run_image_features(ctx: StageContext, inter: Artifact, map_shards: ShardMapper | None = None) -> StageOutcome:
    icfg = ctx.cfg.image_features
    imported = imported_feature(inter, "image_feat.npy")
    if icfg.source == "amazon2014" and not imported:
        return run_amazon2014_image_features(ctx, inter)
    params = {"imported": str(imported)} if imported else image_settings(ctx, inter)

    def build(out: Path) -> dict[str, Any]:
        _, n_items = dataset_counts(inter)
        if imported:
            return copy_imported(imported, out, "image_feat.npy", n_items)
        items = pd.read_parquet(inter.file("items.parquet")).sort_values("item")
        if "image_url" not in items.columns:
            raise StageError(missing_feature_message(ctx, inter, "image", "image URLs"))
        urls = items["image_url"].fillna("").astype(str).tolist()
        work = ctx.store.work_dir("image_features", ctx.work_key("image_features", params, {"interactions": inter}))
        if "image_features" in ctx.refresh:  # re-encode: finished shards of an earlier run are not reused
            for old in (*work.glob("shard-*.npz"), work / "cnn.pt"):
                old.unlink(missing_ok=True)
        cnn_file, weights_description = _stage_cnn(work, ctx.store.cache_dir("image_features") / "cnn",
                                                   params["backbone"], params["weights"], icfg.seed,
                                                   reuse="image_features" not in ctx.refresh)
        policy = UrlPolicy.for_origin(image_url_origin(inter), icfg.allow_hosts)
        fetch_kwargs = dict(concurrency=icfg.concurrency, timeout=icfg.timeout, retries=icfg.retries,
                            max_bytes=icfg.max_bytes, min_side=icfg.min_side, max_pixels=icfg.max_pixels, policy=policy,
                            progress=False)
        precision = encoder_precision(icfg.precision, icfg.device)
        # num_workers None: the shard's default, the cores the forward leaves free
        encoder_kwargs = dict(backbone=params["backbone"], weights=str(cnn_file), image_size=params["image_size"],
                              batch_size=icfg.batch_size, device=icfg.device, num_workers=icfg.num_workers,
                              max_bytes=icfg.max_bytes, max_pixels=icfg.max_pixels, engine=icfg.engine,
                              precision=precision, threads=_torch_threads())
        # Shared by every dataset and snapshot of this data root: a shard encodes only images whose bytes this encoder
        # has not seen (a refresh reads none of it, but refills it).
        features_cache = str(ctx.store.cache_dir("image_features"))
        read_cache = "image_features" not in ctx.refresh
        jobs = [(list(rng), urls[rng.start : rng.stop], str(ctx.store.cache_dir("images")), fetch_kwargs,
                 encoder_kwargs, features_cache, read_cache, str(work / f"shard-{i:05d}.npz"))
                for i, rng in enumerate(shard_items(n_items, icfg.shard_size))]
        resumed = sum(Path(job[-1]).exists() for job in jobs)
        log.info("image_features: %d shards, %d finished by an earlier run", len(jobs), resumed)
        paths = (map_shards or _map_locally)(run_image_shard_job, jobs)
        shards = [load_shard(Path(p)) for p in paths]
        dim = max((s.dim for s in shards), default=0)
        feats, missing = assemble_features(n_items, shards, dim, fill=icfg.fill)
        np.save(out / "image_feat.npy", feats.astype(np.float32))
        missing.to_csv(out / "missing_images.csv", index=False)
        reasons = missing["reason"].value_counts().to_dict() if len(missing) else {}
        if len(missing):
            log.warning("image_features: %d of %d items without a usable image (%s), filled with %s",
                        len(missing), n_items, reasons, icfg.fill)
        return {"source": "encoded", "backbone": params["backbone"], "weights": params["weights"],
                "shape": list(feats.shape), "missing": int(len(missing)), "missing_reasons": jsonable(reasons),
                "fill": icfg.fill, "shards": len(jobs), "shards_encoded": len(jobs) - resumed,
                "shards_resumed": resumed, "weights_description": weights_description,
                "url_policy": policy.describe(), "engine": icfg.engine, "precision": precision,
                "threads": encoder_kwargs["threads"],
                # distinct images (by bytes) read from the per-item cache / encoded, in this run's shards
                "cache": {"hits": sum(s.n_cached for s in shards), "misses": sum(s.n_encoded for s in shards),
                          "read": read_cache}}

    return ctx.run("image_features", params, {"interactions": inter}, build)
