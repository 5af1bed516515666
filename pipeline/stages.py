"""The pipeline's stages as plain functions over the artifact store.

Each ``run_<stage>`` takes a :class:`Context` and the input artifacts it reads,
and returns a :class:`~pipeline.store.StageOutcome`. The store decides whether
any work is needed (same key: cached). Nothing here imports Prefect: the flow
layer wraps these functions, and a notebook can call them directly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sand.pipeline.config import PipelineConfig
from sand.pipeline.errors import ConfigError, StageError
from sand.pipeline.store import Artifact, ArtifactStore, StageOutcome

log = logging.getLogger(__name__)

#: Bump a stage's version when its code changes what it writes: old artifacts stop matching.
STAGE_VERSIONS = {
    "acquire": "1",
    "interactions": "2",
    "text_features": "1",
    "image_features": "2",
    "graphs": "1",
    "train": "1",
    "evaluate": "1",
    "report": "1",
}

#: Fields that change speed, not results: left out of artifact keys. Only fields with a test
#: showing the same artifact bytes under a changed value belong here (tests/test_cache_keys.py):
#: batch sizes, block sizes and devices change float bits (BLAS and conv kernels pick their
#: algorithm by shape and device), so they are part of every key that sees them.
PERFORMANCE_FIELDS = {"num_workers", "concurrency"}

#: A function that runs picklable shard jobs, e.g. over a Prefect task runner.
ShardMapper = Callable[[Callable[..., Any], Sequence[tuple[Any, ...]]], list[Any]]


@dataclass
class Context:
    """Everything a stage needs besides its inputs."""

    cfg: PipelineConfig
    store: ArtifactStore
    refresh: frozenset[str] = field(default_factory=frozenset)
    progress: bool = True

    @classmethod
    def create(cls, cfg: PipelineConfig, refresh: Sequence[str] = (), progress: bool = True) -> Context:
        from sand.pipeline.devices import check_devices

        cfg = cfg.resolved()
        check_devices(cfg)  # a deployment's worker may lack the GPU the config asks for
        # Absolute, so artifact paths stay valid in Prefect subprocesses and on Dask workers.
        cfg = cfg.model_copy(update={"data_root": Path(cfg.data_root).expanduser().resolve()})
        return cls(cfg, ArtifactStore(cfg.data_root), frozenset(refresh), progress)


def key_params(section: Any, drop: set[str] = PERFORMANCE_FIELDS, allow_mps: bool = False) -> dict[str, Any]:
    """A config section as artifact-key parameters, without speed-only knobs.

    A ``device`` field enters the key as the device type the stage will compute on
    (``None`` resolved here, as the stage resolves it), so a GPU-built artifact is
    not served as a CPU run's result.
    """
    params = {k: v for k, v in section.model_dump(mode="json").items() if k not in drop}
    if "device" in params:
        from sand.pipeline.devices import device_type

        params["device"] = device_type(params["device"], allow_mps=allow_mps)
    return params


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link big raw files into an artifact (no second copy on disk); copy across devices."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ---------------------------------------------------------------------------------------------
# acquire
# ---------------------------------------------------------------------------------------------
def _local_fingerprint(source: str | None) -> dict[str, Any] | None:
    """For local inputs the key includes size and mtime, so an edited file is re-acquired."""
    from sand.pipeline.locations import local_path

    path = local_path(source) if source else None
    if path is None:  # remote: the download's own checks decide
        return None
    if path.is_dir():
        return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.iterdir()) if p.is_file()}
    if path.exists():
        st = path.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return None


def run_acquire(ctx: Context) -> StageOutcome:
    from sand.pipeline.acquire.sources import resolve_source

    acfg = ctx.cfg.acquire
    spec = resolve_source(acfg.dataset, acfg.format, acfg.reviews, acfg.meta)
    params: dict[str, Any] = {
        "name": spec.name,
        "format": spec.format,
        "reviews": spec.reviews,
        "meta": spec.meta,
        "mmrec_dir": str(spec.mmrec_dir) if spec.mmrec_dir else None,
    }
    if spec.format == "sample":
        params.update(seed=acfg.sample_seed, users=acfg.sample_users, items=acfg.sample_items)
    else:
        params["fingerprint"] = {
            "reviews": _local_fingerprint(spec.reviews),
            "meta": _local_fingerprint(spec.meta),
            "mmrec": _local_fingerprint(str(spec.mmrec_dir)) if spec.mmrec_dir else None,
        }

    def build(out: Path) -> dict[str, Any]:
        files: dict[str, Any] = {}
        if spec.format == "sample":
            from sand.pipeline.acquire.bundled_sample import generate_sample

            # The sample's images play the part of the internet: they live outside the
            # artifact at a stable path so their file:// URLs stay valid after the rename.
            origin = ctx.store.data_root / "sample" / f"seed{acfg.sample_seed}-{acfg.sample_users}x{acfg.sample_items}"
            generated = generate_sample(
                origin, seed=acfg.sample_seed, n_users=acfg.sample_users, n_items=acfg.sample_items
            )
            for role, src in (("reviews", generated.reviews), ("meta", generated.meta)):
                dst = out / Path(src).name
                shutil.copy2(src, dst)
                files[role] = dst.name
            return {"format": "amazon2014", "name": spec.name, "files": files, "sample_origin": str(origin)}
        if spec.format == "mmrec":
            src_dir = Path(spec.mmrec_dir)
            for src in sorted(src_dir.iterdir()):
                if src.is_file() and (src.suffix in {".inter", ".npy", ".csv", ".npz"} or src.name == "README.md"):
                    _link_or_copy(src, out / src.name)
                    files[src.name] = src.name
            return {"format": "mmrec", "name": spec.name, "files": files}
        from sand.pipeline.acquire.download import fetch_file

        downloads = ctx.store.data_root / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        records = {}
        for role, source in (("reviews", spec.reviews), ("meta", spec.meta)):
            if not source:
                continue
            rec = fetch_file(source, downloads, timeout=acfg.timeout, retries=acfg.retries, progress=ctx.progress)
            dst = out / f"{role}-{rec.path.name}"
            _link_or_copy(rec.path, dst)
            files[role] = dst.name
            records[role] = rec.to_dict()
        return {"format": spec.format, "name": spec.name, "files": files, "downloads": records}

    return ctx.store.run("acquire", STAGE_VERSIONS["acquire"], params, {}, build, "acquire" in ctx.refresh)


# ---------------------------------------------------------------------------------------------
# interactions
# ---------------------------------------------------------------------------------------------
def run_interactions(ctx: Context, raw: Artifact) -> StageOutcome:
    icfg = ctx.cfg.interactions
    fmt = raw.manifest["format"]
    params = key_params(icfg) if fmt != "mmrec" else {"kept": "given split and ids"}

    def build(out: Path) -> dict[str, Any]:
        from sand.pipeline.dataset.interactions import interactions_from_mmrec

        skips: dict[str, Any] = {}
        if fmt == "mmrec":
            from sand.pipeline.dataset.mmrec import read_mmrec_folder

            result = interactions_from_mmrec(read_mmrec_folder(raw.path))
        else:
            result = _interactions_from_dumps(raw, fmt, icfg, skips, ctx.progress)
        result.interactions.to_parquet(out / "interactions.parquet", index=False)
        result.items.to_parquet(out / "items.parquet", index=False)
        result.user_map.to_parquet(out / "user_map.parquet", index=False)
        result.item_map.to_parquet(out / "item_map.parquet", index=False)
        return {"stats": _jsonable(result.stats), "skipped": skips, "name": raw.manifest.get("name")}

    return ctx.store.run(
        "interactions", STAGE_VERSIONS["interactions"], params, {"raw": raw}, build, "interactions" in ctx.refresh
    )


def _interactions_from_dumps(raw: Artifact, fmt: str, icfg: Any, skips: dict[str, Any], progress: bool) -> Any:
    """Raw dumps -> InteractionsResult in bounded memory (see :mod:`pipeline.columnar`)."""
    from tqdm.auto import tqdm

    from sand.pipeline.dataset.columnar import interactions_from_dumps

    files = raw.manifest["files"]
    with tqdm(desc="reading reviews", unit=" lines", unit_scale=True, disable=not progress) as bar:
        result, reports = interactions_from_dumps(
            raw.file(files["reviews"]),
            raw.file(files["meta"]) if "meta" in files else None,
            fmt,
            k_core=icfg.k_core,
            split_rule=icfg.split,
            seed=icfg.seed,
            max_bad_lines=icfg.max_bad_lines,
            max_line_bytes=icfg.max_line_bytes,
            progress=bar.update,
        )
    skips.update({role: _skip_dict(report) for role, report in reports.items()})
    return result


def _skip_dict(report: Any) -> dict[str, Any]:
    """A reader's SkipReport for the manifest (the reader has already logged it)."""
    return _jsonable(report.to_dict()) if report is not None else {}


def _file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _jsonable(obj: Any) -> Any:
    """numpy scalars and paths to plain JSON values (manifests must be readable anywhere)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def dataset_counts(inter: Artifact) -> tuple[int, int]:
    stats = inter.manifest["stats"]
    return int(stats["users"]), int(stats["items"])


def _imported_feature(inter: Artifact, name: str) -> Path | None:
    """An MMRec folder may ship ``image_feat.npy`` / ``text_feat.npy``: used as they are."""
    raw_path = inter.manifest["inputs"]["raw"]["path"]
    candidate = Path(raw_path) / name
    return candidate if candidate.is_file() else None


def _missing_feature_message(ctx: Context, inter: Artifact, modality: str, what: str) -> str:
    """Name the model that needs the features and the folder the user gave."""
    raw = Path(inter.manifest["inputs"]["raw"]["path"])
    try:
        origin = json.loads((raw / "manifest.json").read_text())["params"].get("mmrec_dir") or raw
    except (OSError, KeyError, json.JSONDecodeError):
        origin = raw
    return (
        f"model {ctx.cfg.train.model!r} needs {modality} features: the dataset has no {what} and {origin} "
        f"has no {modality}_feat.npy (add one, or train an ID-only model: --model bpr | lightgcn)"
    )


def _copy_imported(src: Path, out: Path, name: str, n_items: int) -> dict[str, Any]:
    feats = np.load(src, allow_pickle=False)
    if feats.ndim != 2 or feats.shape[0] != n_items:
        raise StageError(f"{src}: expected {n_items} rows (one per item), found shape {feats.shape}")
    np.save(out / name, feats.astype(np.float32, copy=False))
    return {"source": "imported", "file": str(src), "shape": list(feats.shape)}


# ---------------------------------------------------------------------------------------------
# text_features
# ---------------------------------------------------------------------------------------------
#: Text settings that change speed, or only the last float bits (documented): not in the key.
TEXT_PERFORMANCE_FIELDS = PERFORMANCE_FIELDS | {"shard_size", "threads"}


def _stage_work_key(stage: str, params: dict[str, Any], inputs: dict[str, Artifact]) -> str:
    """Key of a stage's resumable scratch directory (same scheme as artifact keys)."""
    from sand.pipeline.store import artifact_key

    return artifact_key(stage, STAGE_VERSIONS[stage], params, {k: a.key for k, a in inputs.items()})


def _run_text_shard_job(job: Any) -> str:
    """One picklable text shard job (runs in a thread, a process or on a Dask worker)."""
    from sand.pipeline.features.text import run_text_shard

    return run_text_shard(job)


def _map_text_locally(fn: Callable[..., Any], jobs: Sequence[Any]) -> list[Any]:
    from tqdm import tqdm

    return [fn(job) for job in tqdm(jobs, desc="text shards", disable=len(jobs) < 2)]


def run_text_features(ctx: Context, inter: Artifact, map_shards: ShardMapper | None = None) -> StageOutcome:
    """Item texts -> ``text_feat.npy``, as shard jobs over ``map_shards`` (default: in this process).

    The bytes do not depend on the runner, the shard size or a resume: shards are whole
    encoding groups, each shard pins its torch thread count, and finished shard files are
    reused (see :mod:`pipeline.text_features`).
    """
    tcfg = ctx.cfg.text_features
    imported = _imported_feature(inter, "text_feat.npy")
    if imported:
        params: dict[str, Any] = {"imported": str(imported)}
    else:
        import torch

        # sentence-transformers picks MPS by itself where present; the thread count changes the
        # vectors' last bits, so the count the shards will pin is part of the key
        params = key_params(tcfg, TEXT_PERFORMANCE_FIELDS, allow_mps=True)
        params["threads"] = tcfg.threads or torch.get_num_threads()

    def build(out: Path) -> dict[str, Any]:
        _, n_items = dataset_counts(inter)
        if imported:
            return _copy_imported(imported, out, "text_feat.npy", n_items)
        from dataclasses import asdict

        from sand.pipeline.features.text import assemble_text_features, item_text, plan_text_shards

        items = pd.read_parquet(inter.file("items.parquet"))
        if "title" not in items.columns or not items.get("has_meta", pd.Series([True])).any():
            raise StageError(_missing_feature_message(ctx, inter, "text", "item text"))
        items = items.sort_values("item")
        texts = [
            item_text(r.title, r.brand, r.categories, r.description) for r in items.itertuples(index=False)
        ]
        threads = params["threads"]
        bits = {**params, "batch_size": tcfg.batch_size, "device": tcfg.device}
        work = ctx.store.work_dir("text_features", _stage_work_key("text_features", bits, {"interactions": inter}))
        # Vectors depend on the batch (padding), the device and the thread count: each has its own per-item cache.
        cache = ctx.store.cache_dir("text") / f"batch{tcfg.batch_size}-{params['device']}-threads{threads}"
        uniq, jobs, stats = plan_text_shards(
            texts, tcfg.model, batch_size=tcfg.batch_size, device=tcfg.device, threads=threads,
            cache_dir=cache, shard_size=tcfg.shard_size, work_dir=work,
        )
        paths = (map_shards or _map_text_locally)(_run_text_shard_job, jobs)
        shape = assemble_text_features(uniq, paths, out / "text_feat.npy")
        shutil.rmtree(work, ignore_errors=True)
        log.info("text features: %d texts (%d unique), %d from cache, %d encoded in %d shards",
                 stats.n_texts, stats.n_unique, stats.n_cached, stats.n_encoded, len(jobs))
        return {"source": "encoded", "model": tcfg.model, "recipe": "title + brand + first category path + "
                "description", "shape": list(shape), "encoding": asdict(stats), "shards": len(jobs),
                "threads": threads, "batch_size": tcfg.batch_size}

    return ctx.store.run(
        "text_features", STAGE_VERSIONS["text_features"], params, {"interactions": inter}, build,
        "text_features" in ctx.refresh,
    )


# ---------------------------------------------------------------------------------------------
# image_features
# ---------------------------------------------------------------------------------------------
def image_settings(ctx: Context, inter: Artifact) -> dict[str, Any]:
    """Image stage parameters with dataset-dependent defaults filled in.

    The bundled sample defaults to a small randomly initialised resnet18 because
    pretrained weights cannot be downloaded offline; real datasets default to
    torchvision's ImageNet resnet50. The manifest records which one was used.
    """
    icfg = ctx.cfg.image_features
    is_sample = ctx.cfg.acquire.dataset == "sample"
    weights = icfg.weights
    if weights == "auto":
        weights = "random" if is_sample else "imagenet"
    params = key_params(icfg, PERFORMANCE_FIELDS | {"source", "amazon2014_url"})  # amazon2014-only fields
    params.update(
        backbone=icfg.backbone or ("resnet18" if is_sample else "resnet50"),
        weights=weights,
        image_size=icfg.image_size or (64 if is_sample else 224),
    )
    if weights not in ("random", "imagenet"):
        params["weights_fingerprint"] = _local_fingerprint(weights)
    return params


def image_url_origin(inter: Artifact) -> str:
    """``network`` when the metadata naming the image URLs was downloaded, else ``local``.

    Trust follows origin: the acquire artifact records the sources the user gave
    (``params``); the bundled sample, MMRec folders and local files or ``file://``
    sources are the user's own, anything fetched over http(s) is not.
    """
    from sand.pipeline.acquire.url_policy import host_and_port

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


def _stage_cnn(work: Path, backbone: str, weights: str, seed: int) -> tuple[Path, str]:
    """Build the stage's CNN once and save it where every shard (thread, process, Dask worker) loads it.

    Why: shards building their own random CNN would each draw from a racing RNG
    (different features per shard and per run); one file, loaded with
    ``weights_only=True``, gives every shard the same bytes.
    """
    from sand.pipeline.features.image_encoder import build_cnn, save_cnn

    model, _, description = build_cnn(backbone, weights, seed)
    return save_cnn(model, work / "cnn.pt"), description


def _run_shard_job(args: tuple[Any, ...]) -> str:
    """One picklable shard job (runs in a thread, a process or on a Dask worker)."""
    from sand.pipeline.features.image_shards import process_shard, save_shard

    item_ids, urls, cache_dir, fetch_kwargs, encoder_kwargs, out_path = args
    out_path = Path(out_path)
    if out_path.exists():  # finished by an earlier, interrupted run
        return str(out_path)
    result = process_shard(item_ids, urls, Path(cache_dir), fetch_kwargs, encoder_kwargs)
    save_shard(result, out_path)
    return str(out_path)


def _map_locally(fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]]) -> list[Any]:
    from tqdm import tqdm

    return [fn(job) for job in tqdm(jobs, desc="image shards", disable=len(jobs) < 2)]


def run_image_features(ctx: Context, inter: Artifact, map_shards: ShardMapper | None = None) -> StageOutcome:
    icfg = ctx.cfg.image_features
    imported = _imported_feature(inter, "image_feat.npy")
    if icfg.source == "amazon2014" and not imported:
        from sand.pipeline.features.amazon2014_stage import run_amazon2014_image_features

        return run_amazon2014_image_features(ctx, inter)
    params = {"imported": str(imported)} if imported else image_settings(ctx, inter)

    def build(out: Path) -> dict[str, Any]:
        _, n_items = dataset_counts(inter)
        if imported:
            return _copy_imported(imported, out, "image_feat.npy", n_items)
        from sand.pipeline.features.image_shards import assemble_features, load_shard, shard_items

        items = pd.read_parquet(inter.file("items.parquet")).sort_values("item")
        if "image_url" not in items.columns:
            raise StageError(_missing_feature_message(ctx, inter, "image", "image URLs"))
        urls = items["image_url"].fillna("").astype(str).tolist()
        from sand.pipeline.acquire.url_policy import UrlPolicy

        work = ctx.store.work_dir("image_features", _stage_work_key("image_features", params, {"interactions": inter}))
        if "image_features" in ctx.refresh:  # re-encode: finished shards of an earlier run are not reused
            for old in (*work.glob("shard-*.npz"), work / "cnn.pt"):
                old.unlink(missing_ok=True)
        cnn_file, weights_description = _stage_cnn(work, params["backbone"], params["weights"], icfg.seed)
        policy = UrlPolicy.for_origin(image_url_origin(inter), icfg.allow_hosts)
        fetch_kwargs = dict(
            concurrency=icfg.concurrency, timeout=icfg.timeout, retries=icfg.retries, max_bytes=icfg.max_bytes,
            min_side=icfg.min_side, max_pixels=icfg.max_pixels, policy=policy, progress=False,
        )
        encoder_kwargs = dict(
            backbone=params["backbone"], weights=str(cnn_file), image_size=params["image_size"],
            batch_size=icfg.batch_size, num_workers=icfg.num_workers, device=icfg.device,
            max_bytes=icfg.max_bytes, max_pixels=icfg.max_pixels,
        )
        jobs = []
        for i, rng in enumerate(shard_items(n_items, icfg.shard_size)):
            ids = list(rng)
            jobs.append((ids, [urls[j] for j in ids], str(ctx.store.cache_dir("images")), fetch_kwargs,
                         encoder_kwargs, str(work / f"shard-{i:05d}.npz")))
        resumed = sum(Path(job[-1]).exists() for job in jobs)
        log.info("image_features: %d shards, %d finished by an earlier run", len(jobs), resumed)
        paths = (map_shards or _map_locally)(_run_shard_job, jobs)
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
                "shape": list(feats.shape), "missing": int(len(missing)), "missing_reasons": _jsonable(reasons),
                "fill": icfg.fill, "shards": len(jobs), "shards_encoded": len(jobs) - resumed,
                "shards_resumed": resumed, "weights_description": weights_description,
                "url_policy": policy.describe()}

    return ctx.store.run(
        "image_features", STAGE_VERSIONS["image_features"], params, {"interactions": inter}, build,
        "image_features" in ctx.refresh,
    )


# ---------------------------------------------------------------------------------------------
# graphs
# ---------------------------------------------------------------------------------------------
#: Graph settings used only by the faiss method (left out of the key of an exact graph).
_FAISS_FIELDS = {"nlist", "nprobe", "target_recall", "recall_sample", "seed"}


def graph_method(ctx: Context, text: Artifact, image: Artifact) -> str:
    """The graph method this run uses (``auto`` resolved by catalogue size and CUDA)."""
    import torch

    from sand.pipeline.features.ann import resolve_method

    gcfg = ctx.cfg.graphs
    shape = np.load(text.file("text_feat.npy"), mmap_mode="r").shape
    return resolve_method(gcfg.method, int(shape[0]), gcfg.auto_threshold, cuda=torch.cuda.is_available())


def run_graphs(ctx: Context, text: Artifact, image: Artifact) -> StageOutcome:
    gcfg = ctx.cfg.graphs
    method = graph_method(ctx, text, image)
    drop = PERFORMANCE_FIELDS | {"auto_threshold"} | (_FAISS_FIELDS if method == "exact" else set())
    params = {**key_params(gcfg, drop), "method": method}

    def build(out: Path) -> dict[str, Any]:
        from sand.pipeline.features.knn import graph_from_neighbours, knn_neighbours, save_graph

        stats = {}
        for modality, art, name in (("image", image, "image_feat.npy"), ("text", text, "text_feat.npy")):
            # Memory-mapped: the exact path makes one normalised float32 copy, faiss only its index.
            feats = np.load(art.file(name), mmap_mode="r", allow_pickle=False)
            info: dict[str, Any] = {"method": method}
            if method == "faiss":
                from sand.pipeline.features.ann import faiss_neighbours

                nbrs, report = faiss_neighbours(
                    feats, gcfg.k, include_self=gcfg.include_self, nlist=gcfg.nlist, nprobe=gcfg.nprobe,
                    target_recall=gcfg.target_recall, recall_sample=gcfg.recall_sample, seed=gcfg.seed,
                    progress=ctx.progress,
                )
                info["ann"] = report.to_dict()
            else:
                nbrs = knn_neighbours(feats, gcfg.k, include_self=gcfg.include_self, block_size=gcfg.block_size,
                                      progress=ctx.progress)
            graph = graph_from_neighbours(nbrs)
            save_graph(out / f"{modality}_graph.npz", graph)
            stats[modality] = {"nnz": int(graph.nnz), "shape": list(graph.shape), **info}
        return {"graphs": stats, "method": method, "note": "image/text mix weight is applied at model time"}

    return ctx.store.run(
        "graphs", STAGE_VERSIONS["graphs"], params, {"text_features": text, "image_features": image},
        build, "graphs" in ctx.refresh,
    )


# ---------------------------------------------------------------------------------------------
# train / evaluate
# ---------------------------------------------------------------------------------------------
def _model_inputs(inter: Artifact, feature_arts: dict[str, Artifact]) -> dict[str, Artifact]:
    return {"interactions": inter, **feature_arts}


def load_feature_tensor(path: Path):
    """A feature matrix as a float32 tensor over a memory map of the ``.npy`` file, not a copy.

    Why: a million 4,096-d items are 16 GB; mapped, the pages come from the page cache on
    demand and the models that keep raw features as a frozen buffer (SAND, VBPR) hold no
    second copy on CPU (on a GPU, the one device copy). Copy-on-write (``mmap_mode="c"``):
    a model that writes into its features changes private pages, never the artifact.
    Other dtypes (an imported float16 file) are converted once, to one float32 copy.
    """
    import torch

    arr = np.load(path, mmap_mode="c", allow_pickle=False)
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return torch.from_numpy(arr)


def load_model_inputs(ctx: Context, inter: Artifact, feature_arts: dict[str, Artifact]):
    """SplitData, feature tensors and torch item graphs for building a model."""

    from sand.models.graph import scipy_to_torch_sparse
    from sand.pipeline.dataset.split_data import SplitData

    n_users, n_items = dataset_counts(inter)
    data = SplitData.from_parquet(inter.file("interactions.parquet"), n_users, n_items)
    features, graphs = {}, {}
    if "image_features" in feature_arts:
        features["image"] = load_feature_tensor(feature_arts["image_features"].file("image_feat.npy"))
    if "text_features" in feature_arts:
        features["text"] = load_feature_tensor(feature_arts["text_features"].file("text_feat.npy"))
    if "graphs" in feature_arts:
        from sand.pipeline.features.knn import load_graph

        for modality in ("image", "text"):
            graphs[modality] = scipy_to_torch_sparse(load_graph(feature_arts["graphs"].file(f"{modality}_graph.npz")))
    return data, features, graphs


def build_model_for(ctx: Context, inter: Artifact, feature_arts: dict[str, Artifact]):
    """Construct the configured model (seeded) and the data it trains on."""
    import torch

    from sand.models.registry import build_model, default_lr

    tcfg = ctx.cfg.train
    data, features, graphs = load_model_inputs(ctx, inter, feature_arts)
    accepted, kwargs = effective_model_kwargs(tcfg)
    for name in ("lr", "club_lr"):  # SAND's CLUB estimators use the training lr (docs/model.md, CLUB fit)
        if name in accepted and name not in kwargs:
            kwargs[name] = tcfg.lr if tcfg.lr is not None else default_lr(tcfg.model)
    torch.manual_seed(tcfg.seed)
    try:
        model = build_model(
            tcfg.model, variant=tcfg.variant, n_users=data.n_users, n_items=data.n_items,
            train_edges=torch.from_numpy(data.train), features=features, item_graphs=graphs, **kwargs,
        )
    except ValueError as err:  # models/ raises ValueError; here it becomes the user's one-line error
        raise ConfigError(f"train.model={tcfg.model}: {err}") from None
    return model, data


def effective_model_kwargs(tcfg: Any) -> tuple[set[str], dict[str, Any]]:
    """(accepted hyper-parameter names, keywords for the model): the profile, then explicit settings."""
    from sand.models.registry import accepted_hyperparameters, profile_hyperparameters

    accepted = accepted_hyperparameters(tcfg.model)
    return accepted, {**profile_hyperparameters(tcfg.model, tcfg.profile), **tcfg.model_kwargs(accepted)}


def train_key_params(tcfg: Any) -> dict[str, Any]:
    """Train parameters that reach the model: fields it ignores do not change the artifact key.

    The precision enters as resolved on this machine (``auto`` is bf16 on one machine and
    fp32 on another, and bf16 changes the results), only when it is not fp32 (artifacts
    trained before the field existed keep their keys) and only for models that read
    features (the ID-only ones compute the same in either).
    """
    from sand.models.registry import (
        accepted_hyperparameters,
        has_variants,
        profile_hyperparameters,
        required_modalities,
    )

    accepted = accepted_hyperparameters(tcfg.model)
    ignored = {n for n in tcfg.NAMED_HYPERPARAMETERS if n not in accepted}
    if not has_variants(tcfg.model):
        ignored.add("variant")
    if not profile_hyperparameters(tcfg.model, tcfg.profile):
        ignored.add("profile")
    params = key_params(tcfg, PERFORMANCE_FIELDS | ignored | {"precision"})
    precision = resolved_train_precision(tcfg)
    if precision != "fp32" and required_modalities(tcfg.model):
        params["precision"] = precision
    return params


def resolved_train_precision(tcfg: Any) -> str:
    """``train.precision`` resolved for ``train.device`` on this machine (fp32 | bf16)."""
    from sand.pipeline.hardware import resolve_device, resolve_precision

    return resolve_precision(tcfg.precision, resolve_device(tcfg.device))


#: What a training work directory was started with (params and input keys), for restart messages.
RUN_FILE = "run.json"


def _interrupted_sibling(
    work: Path, params: dict[str, Any], input_keys: dict[str, str]
) -> tuple[Path, str] | None:
    """The latest interrupted training run of the same model under other parameters or inputs.

    Work directories are keyed by every parameter, so such a run is never continued (its
    checkpoints would mix two settings): this only lets the log and the manifest say that
    training restarted, and what changed.
    """
    from sand.pipeline.training.trainer import LAST_NAME, describe_changes

    latest: tuple[float, Path, dict[str, Any]] | None = None
    for other in work.parent.iterdir():
        last = other / LAST_NAME
        if other == work or not last.is_file():
            continue
        try:
            run = json.loads((other / RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if run.get("params", {}).get("model") != params.get("model"):
            continue
        mtime = last.stat().st_mtime
        if latest is None or mtime > latest[0]:
            latest = (mtime, other, run)
    if latest is None:
        return None
    _, other, run = latest
    return other, describe_changes({"params": run.get("params"), "inputs": run.get("inputs")},
                                   {"params": params, "inputs": input_keys})


def run_train(ctx: Context, inter: Artifact, feature_arts: dict[str, Artifact]) -> StageOutcome:
    from sand.pipeline.store import artifact_key, write_json_atomic

    tcfg = ctx.cfg.train
    ks = tuple(sorted(set(ctx.cfg.evaluate.ks) | {10, 20}))
    # The train summary reports metrics at these ks, so they are part of what the artifact holds.
    params = {**train_key_params(tcfg), "eval_ks": list(ks)}
    inputs = _model_inputs(inter, feature_arts)
    input_keys = {k: a.key for k, a in inputs.items()}
    work_key = artifact_key("train", STAGE_VERSIONS["train"], params, input_keys)

    def build(out: Path) -> dict[str, Any]:
        from sand.models.registry import default_lr, recorded_variant
        from sand.pipeline.training.trainer import LAST_NAME, train_model

        model, data = build_model_for(ctx, inter, feature_arts)
        # Keyed by every parameter and input: a rerun of the same settings resumes from the
        # last checkpoint; other settings get their own directory and start at epoch 1.
        work = ctx.store.work_dir("train", work_key)
        fresh = not (work / LAST_NAME).is_file()
        write_json_atomic(work / RUN_FILE, {"params": params, "inputs": input_keys})
        sibling = _interrupted_sibling(work, params, input_keys) if fresh else None
        if sibling is not None:
            log.info("train: starting at epoch 1, parameters changed since the interrupted run in %s: %s "
                     "(its checkpoints are kept; rerun with its settings to resume it)", *sibling)
        lr = tcfg.lr if tcfg.lr is not None else default_lr(tcfg.model)
        result = train_model(
            model, data, out_dir=work, epochs=tcfg.epochs, batch_size=tcfg.batch_size, lr=lr,
            weight_decay=tcfg.weight_decay, patience=tcfg.resolved_patience(ctx.cfg.acquire.dataset),
            early_stop=tcfg.early_stop, eval_every=tcfg.eval_every, seed=tcfg.seed,
            device=tcfg.device, ks=ks, progress=ctx.progress, resume=True,
            signature={"params": params, "inputs": input_keys}, restart_on_change=True,
            precision=resolved_train_precision(tcfg),
        )
        restarted = result.restarted or (f"parameters changed: {sibling[1]}" if sibling else None)
        for name in ("best.pt", "epochs.csv"):
            shutil.copy2(work / name, out / name)
        summary = {
            "model": tcfg.model, "variant": recorded_variant(tcfg.model, tcfg.variant), "lr": lr,
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "stopped_early": result.stopped_early,
            "best_valid": _jsonable(result.best_valid), "test_at_best": _jsonable(result.test_at_best),
            "seconds_per_epoch": result.seconds_per_epoch, "peak_memory_mb": result.peak_memory_mb,
            "model_kwargs": _jsonable(effective_model_kwargs(tcfg)[1]),
            "plugin_fusion": getattr(model, "plugin_fusion", None), "profile": tcfg.profile,
            "resumed_from_epoch": result.resumed_from_epoch, "restarted": restarted,
            "precision": result.precision,
        }
        (out / "result.json").write_text(json.dumps(summary, indent=2))
        shutil.rmtree(work, ignore_errors=True)
        return {"result": summary}

    return ctx.store.run("train", STAGE_VERSIONS["train"], params, inputs, build, "train" in ctx.refresh)


def trained_embeddings(ctx: Context, inter: Artifact, trained: Artifact, feature_arts: dict[str, Artifact]):
    """(data, user_emb, item_emb) of a trained run: its best checkpoint, a fresh eval-mode forward pass.

    Why fresh: the reference scores with embeddings cached during the last training batch;
    evaluation and ``sand recommend`` both rebuild them from the checkpoint instead.
    """
    import torch

    model, data = build_model_for(ctx, inter, feature_arts)
    state = torch.load(trained.file("best.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"] if "model" in state else state)
    model.eval()
    with torch.no_grad():
        user_emb, item_emb = model.embeddings()
    return data, user_emb, item_emb


def run_evaluate(
    ctx: Context, inter: Artifact, trained: Artifact, feature_arts: dict[str, Artifact]
) -> StageOutcome:
    ecfg = ctx.cfg.evaluate
    params = key_params(ecfg)

    def build(out: Path) -> dict[str, Any]:
        from sand.models.registry import recorded_variant
        from sand.pipeline.training.evaluation import evaluate_split, recommendations_table

        data, user_emb, item_emb = trained_embeddings(ctx, inter, trained, feature_arts)
        metrics = {
            split: evaluate_split(user_emb, item_emb, data, split, ks=tuple(ecfg.ks), batch_users=ecfg.batch_users)
            for split in ("valid", "test")
        }
        recs = recommendations_table(user_emb, item_emb, data, ecfg.top_k)
        recs.to_parquet(out / "recommendations.parquet", index=False)
        (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2))
        model, variant = ctx.cfg.train.model, recorded_variant(ctx.cfg.train.model, ctx.cfg.train.variant)
        return {"metrics": _jsonable(metrics), "model": model, "variant": variant}

    return ctx.store.run(
        "evaluate", STAGE_VERSIONS["evaluate"], params, {"train": trained, **_model_inputs(inter, feature_arts)},
        build, "evaluate" in ctx.refresh,
    )


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def run_report(ctx: Context) -> StageOutcome:
    """Tables and figures over every evaluated run in the store (cached while the set is unchanged)."""
    rcfg = ctx.cfg.report
    evaluations = sorted(a.key for a in ctx.store.list("evaluate"))
    # Grid tables feed the sensitivity figure: a changed grid must give a new report.
    grids = {p.parent.name: _file_digest(p) for p in sorted((ctx.store.data_root / "grids").glob("*/runs.csv"))}
    params = {**key_params(rcfg), "evaluations": evaluations, "grids": grids}

    def build(out: Path) -> dict[str, Any]:
        from sand.pipeline.experiments.report import write_report

        files = write_report(ctx.store.data_root, out, tsne_items=rcfg.tsne_items, seed=rcfg.seed,
                             select_metric=rcfg.select_metric)
        return {"files": {name: [str(Path(p).relative_to(out)) for p in paths] for name, paths in files.items()}}

    return ctx.store.run("report", STAGE_VERSIONS["report"], params, {}, build, "report" in ctx.refresh)
