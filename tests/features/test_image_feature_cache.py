"""The per-item image feature cache: a new snapshot encodes only its new images.

What users rely on: a second snapshot of a category (more items, so every item index
moves) reuses the vectors of the images it shares with the first, byte for byte, and
encodes only the rest; ``--refresh image_features`` encodes everything again; a damaged
cache file is noticed and recomputed, never served; processes filling the cache at the
same time leave it consistent. Images come from a loopback HTTP server.
"""

from __future__ import annotations

import gzip
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sand.pipeline.acquire.bundled_sample import generate_sample
from sand.pipeline.acquire.stage import run_acquire
from sand.pipeline.base.config import load_config
from sand.pipeline.base.hardware import cpu_bf16_support
from sand.pipeline.dataset.stage import run_interactions
from sand.pipeline.features.image_shards import FAST_ENGINE_REVISION, process_shard
from sand.pipeline.features.image_stage import run_image_features
from sand.pipeline.stages import Context

SETTINGS = ["image_features.image_size=32", "image_features.shard_size=8", "image_features.batch_size=4"]


def _snapshot(files, folder: Path, server_url: str, drop: set[str]) -> tuple[Path, Path]:
    """The sample's raw files without the items in ``drop``, its images named by loopback URL."""
    folder.mkdir(parents=True)
    out = []
    for src in (files.reviews, files.meta):
        with gzip.open(src, "rt") as fh:
            lines = [ln.replace(files.images_dir.as_uri() + "/", server_url) for ln in fh
                     if not any(f"'{a}'" in ln or f'"{a}"' in ln for a in drop)]
        dst = folder / src.name
        with gzip.open(dst, "wt") as fh:
            fh.writelines(lines)
        out.append(dst)
    return out[0], out[1]


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """Two snapshots of one raw dataset: the second has every item of the first plus a few more."""
    from conftest import LoopbackServer, Reply

    tmp = tmp_path_factory.mktemp("snapshots")
    files = generate_sample(tmp / "gen", seed=0, n_users=60, n_items=40)
    server = LoopbackServer().start()
    try:
        for img in files.images_dir.iterdir():
            server.routes[f"/img/{img.name}"] = Reply(200, img.read_bytes())
        asins = sorted(files.truth["item_attributes"])
        new = set(asins[1::7])  # spread over the index range: every later item moves
        yield {"first": _snapshot(files, tmp / "first", server.url("/img/"), new),
               "second": _snapshot(files, tmp / "second", server.url("/img/"), set()), "new": new}
    finally:
        server.stop()


def _run(root: Path, name: str, raw: tuple[Path, Path], *extra: str, refresh=(), map_shards=None):
    cfg = load_config(None, {"data_root": str(root), "acquire.dataset": name, "acquire.format": "amazon2014",
                             "acquire.reviews": str(raw[0]), "acquire.meta": str(raw[1]),
                             "image_features.weights": "random", "image_features.backbone": "resnet18"},
                      [*SETTINGS, *extra])
    ctx = Context.create(cfg, refresh=refresh, progress=False)
    inter = run_interactions(ctx, run_acquire(ctx).artifact).artifact
    outcome = run_image_features(ctx, inter, map_shards)
    items = pd.read_parquet(inter.file("items.parquet")).sort_values("item")
    feats = np.load(outcome.artifact.file("image_feat.npy"))
    missing = set(pd.read_csv(outcome.artifact.file("missing_images.csv"))["item"])
    rows = {asin: feats[i].tobytes() for i, asin in zip(items["item"], items["asin"], strict=True) if i not in missing}
    return outcome.artifact.manifest, rows


@pytest.mark.timeout(600)
def test_second_snapshot_encodes_only_its_new_images_and_refresh_encodes_all(snapshots, tmp_path):
    first, rows1 = _run(tmp_path, "snap1", snapshots["first"])
    assert first["cache"]["hits"] == 0 and first["cache"]["misses"] == len(rows1) > 10
    # the defaults: the fast engine, precision auto resolved on this machine (bf16 only with native bf16)
    assert first["engine"] == "fast" and first["precision"] == ("bf16" if cpu_bf16_support() else "fp32")

    second, rows2 = _run(tmp_path, "snap2", snapshots["second"])
    new = set(rows2) - set(rows1)
    assert new and new <= snapshots["new"]
    assert second["cache"] == {"hits": len(rows1), "misses": len(new), "read": True}
    assert all(rows2[a] == rows1[a] for a in rows1), "a shared item's row changed"

    # The reference: the second snapshot alone, on a data root of its own (nothing cached).
    _, fresh = _run(tmp_path / "alone", "snap2", snapshots["second"], "image_features.shard_size=1024")
    assert fresh == rows2

    refreshed, rows3 = _run(tmp_path, "snap2", snapshots["second"], refresh=("image_features",))
    assert refreshed["cache"] == {"hits": 0, "misses": len(rows2), "read": False}
    assert rows3 == rows2


def _on_dask(fn, jobs):
    """Shards on Dask worker processes that read and write the data root themselves."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        return client.gather(client.map(fn, jobs, pure=False))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dask_workers_reuse_and_fill_the_same_cache(snapshots, tmp_path):
    first, rows1 = _run(tmp_path, "snap1", snapshots["first"])
    second, rows2 = _run(tmp_path, "snap2", snapshots["second"], map_shards=_on_dask)
    assert second["shards"] > 1
    assert second["cache"] == {"hits": len(rows1), "misses": len(rows2) - len(rows1), "read": True}
    assert all(rows2[a] == rows1[a] for a in rows1)
    _, fresh = _run(tmp_path / "alone", "snap2", snapshots["second"])
    assert fresh == rows2
    again, rows3 = _run(tmp_path, "snap3", snapshots["second"])  # the workers' new entries, read locally
    assert again["cache"] == {"hits": len(rows2), "misses": 0, "read": True}
    assert rows3 == rows2


def _images(folder: Path, n: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), "RGB").save(path)
        urls.append(path.as_uri())
    return urls


def _shard(urls: list[str], root: Path, cache: Path | None):
    from sand.pipeline.acquire.url_policy import UrlPolicy

    fetch = {"policy": UrlPolicy.for_origin("local", []), "progress": False}
    enc = {"backbone": "resnet18", "weights": "random", "seed": 3, "image_size": 32, "batch_size": 4,
           "num_workers": 1, "device": "cpu", "engine": "fast", "precision": "fp32", "threads": 1}
    return process_shard(list(range(len(urls))), urls, root / "bytes", fetch, enc, feature_cache=cache)


def test_a_corrupted_cache_entry_is_recomputed_not_served(tmp_path, caplog):
    urls = _images(tmp_path / "img", 6)
    cache = tmp_path / "cache"
    first = _shard(urls, tmp_path, cache)
    assert (first.n_cached, first.n_encoded) == (0, 6)
    (chunk,) = cache.rglob("chunk-*.npz")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the vectors
    chunk.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        second = _shard(urls, tmp_path, cache)
    assert "corrupted feature cache chunk" in caplog.text
    assert (second.n_cached, second.n_encoded) == (0, 6)
    assert second.features.tobytes() == first.features.tobytes()
    third = _shard(urls, tmp_path, cache)  # the rewritten entry serves again
    assert (third.n_cached, third.n_encoded) == (6, 0)
    assert third.features.tobytes() == first.features.tobytes()


def test_the_forward_pass_starts_before_the_last_group_is_fetched(tmp_path, monkeypatch):
    """Fetching overlaps encoding: the first group is one batch (nothing is encoded before it arrives), and that batch
    is encoded while later URL groups are still to fetch."""
    from sand.pipeline.features import image_encoder, image_fetch, image_shards

    monkeypatch.setattr(image_shards, "_ENCODERS", image_shards._ProcessMemo())  # built here, whatever ran before
    events: list[str] = []
    fetch, call = image_fetch.fetch_images, image_encoder.Encoder.__call__

    def fetch_logged(urls, *args, **kwargs):
        events.append(f"fetch {len(urls)}")
        return fetch(urls, *args, **kwargs)

    def call_logged(self, batch):
        events.append("encode")
        return call(self, batch)

    monkeypatch.setattr(image_fetch, "fetch_images", fetch_logged)
    monkeypatch.setattr(image_encoder.Encoder, "__call__", call_logged)
    urls = _images(tmp_path / "img", 200)  # batches of 4 images, then groups of 64 URLs
    shard = _shard(urls, tmp_path, None)
    assert (shard.n_encoded, len(shard.item_ids)) == (200, 200)
    fetches = [i for i, e in enumerate(events) if e.startswith("fetch")]
    encodes = [i for i, e in enumerate(events) if e == "encode"]  # the graph's profiling call on zeros, 50 batches
    assert [events[i] for i in fetches] == ["fetch 4", "fetch 64", "fetch 64", "fetch 64", "fetch 4"]
    assert len(encodes) == 51 and encodes[1] < fetches[-1], events


def _fill(args: tuple[list[str], str, str]) -> bytes:
    urls, root, cache = args
    return _shard(urls, Path(root), Path(cache)).features.tobytes()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_filling_the_cache_at_once_agree(tmp_path):
    urls = _images(tmp_path / "img", 10)
    cache = tmp_path / "cache"
    jobs = [(urls, str(tmp_path / f"root{i}"), str(cache)) for i in range(2)]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        a, b = pool.map(_fill, jobs)
    assert a == b
    reread = _shard(urls, tmp_path, cache)
    assert (reread.n_cached, reread.n_encoded) == (10, 0)
    assert reread.features.tobytes() == a
    assert not list(cache.rglob(".*.tmp")), "a temporary file was left behind"


def test_eager_float32_keeps_the_key_it_had_and_other_settings_name_theirs(tmp_path, monkeypatch):
    from sand.pipeline.base import hardware
    from sand.pipeline.features.image_stage import image_settings

    def params(*settings):
        cfg = load_config(None, {"data_root": str(tmp_path)}, ["image_features.device=cpu", *settings])
        return image_settings(Context.create(cfg, progress=False), None)

    before = {"backbone", "weights", "image_size", "batch_size", "max_bytes", "max_pixels", "timeout", "retries",
              "allow_hosts", "min_side", "fill", "shard_size", "seed", "device"}  # the key's fields until now
    monkeypatch.setattr(hardware, "cpu_bf16_support", lambda: False)  # an AVX2-only CPU
    assert set(params("image_features.engine=eager")) == before
    assert params("image_features.engine=fast")["precision"] == "fp32"
    assert params("image_features.engine=fast")["fast_revision"] == FAST_ENGINE_REVISION  # a new graph, new keys
    monkeypatch.setattr(hardware, "cpu_bf16_support", lambda: True)  # an AMX CPU
    assert params("image_features.engine=eager")["precision"] == "bf16"  # auto: bf16 where native
    assert params("image_features.precision=fp32", "image_features.engine=eager").keys() == before


@pytest.mark.parametrize("engine, precision, min_cosine", [("fast", "fp32", 0.99999), ("eager", "bf16", 0.999),
                                                           ("fast", "bf16", 0.999)])
def test_engines_and_precisions_stay_close_to_eager_float32(engine, precision, min_cosine):
    import torch

    from sand.pipeline.features.image_encoder import Encoder, build_cnn

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def features(engine, precision):
        model, _, _ = build_cnn("resnet18", "random", 0)
        return Encoder(model, engine=engine, precision=precision, device=torch.device("cpu"), batch_size=4,
                       image_size=32)(x)

    ref, got = features("eager", "fp32"), features(engine, precision)
    assert got.dtype == np.float32 and got.shape == ref.shape == (4, 512)
    cosine = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cosine.min() > min_cosine
    assert not np.array_equal(got, ref), "another engine or precision: other bytes, hence its own key"


def _fast_resnet50(precision: str):
    import torch

    from sand.pipeline.features.image_encoder import Encoder, build_cnn

    model, _, _ = build_cnn("resnet50", "random", 0)
    return Encoder(model, engine="fast", precision=precision, device=torch.device("cpu"), batch_size=4,
                   image_size=64, threads=1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_fast_engine_gives_a_process_first_batch_the_bits_of_every_later_one(precision):
    """The graph executor computes its first (profiling) call unfused: were that call an image batch, the images that
    happen to come first in a process would get other bits, and one shard layout other bytes than another."""
    import torch

    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    encoder = _fast_resnet50(precision)
    first, later = encoder(x), [encoder(x) for _ in range(2)]
    assert all(np.array_equal(first, again) for again in later)
    assert np.array_equal(_fast_resnet50(precision)(x), first), "another process or shard: the same bits"


def test_the_fast_engine_fuses_on_an_x86_cpu_and_leaves_the_process_switch_as_it_was():
    import torch

    from sand.pipeline.features.image_encoder import onednn_graph_available

    if not onednn_graph_available():
        pytest.skip("oneDNN Graph fusion: x86 CPU builds of torch only")
    encoder = _fast_resnet50("fp32")
    encoder(torch.zeros(4, 3, 64, 64))
    assert "oneDNNFusionGroup" in str(torch.jit.last_executed_optimized_graph())
    assert not torch.jit.onednn_fusion_enabled(), "other TorchScript in the process runs as it would without us"
